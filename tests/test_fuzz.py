"""A bounded barrage of bad input against a real gunicorn: 4xx JSON, never a crash."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .gunicorn import start_gunicorn
from .http_client import create_request, logged_in_session

pytestmark = pytest.mark.integration

REQUEST_TYPES = [
    "threads.create",
    "threads.add_user_message",
    "threads.get_by_id",
    "threads.list",
    "items.list",
    "threads.update",
    "threads.delete",
    "threads.retry_after_item",
    "threads.custom_action",
    "items.feedback",
    "attachments.create",
    "attachments.delete",
    "input.transcribe",
    "threads.sync_custom_action",
    "nonsense",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
id_like = st.sampled_from(["thr_x", "msg_x", "atc_x", "", "../../etc/passwd", "%00"]) | st.text(
    max_size=12
)
payloads = st.fixed_dictionaries(
    {"type": st.sampled_from(REQUEST_TYPES)},
    optional={
        "params": st.dictionaries(
            st.sampled_from(
                [
                    "thread_id",
                    "item_id",
                    "limit",
                    "after",
                    "order",
                    "input",
                    "title",
                    "attachment_id",
                    "item_ids",
                    "kind",
                    "action",
                    "name",
                    "size",
                    "mime_type",
                ]
            ),
            json_values | id_like,
            max_size=5,
        ),
        "metadata": json_values,
    },
)
bodies = (
    payloads.map(lambda p: json.dumps(p).encode())
    | st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with start_gunicorn(tmp_path_factory.mktemp("fuzz")) as running:
        running.initial_workers = running.worker_pids()  # type: ignore[attr-defined]
        yield running


@pytest.fixture(scope="module")
def session(server: Any) -> requests.Session:
    return logged_in_session(server.url, "fuzzer")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=bodies,
    content_type=st.sampled_from(
        ["application/json", "application/json; charset=utf-8", "text/plain"]
    ),
)
def test_bad_input_gets_json_4xx(
    server: Any, session: requests.Session, body: bytes, content_type: str
) -> None:
    response = session.post(
        f"{server.url}/chatkit", data=body, headers={"Content-Type": content_type}, timeout=30
    )
    if response.status_code == 200:
        return  # the fuzzer produced a valid request; fine
    if response.status_code == 501:  # a valid request for an operation the app lacks
        assert response.json()["error"]["code"] == "not_implemented", response.text[:300]
        return
    assert 400 <= response.status_code < 500, (
        response.status_code,
        body[:200],
        response.text[:300],
    )
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and error["message"]
    assert "Traceback" not in response.text


def test_server_still_serves_after_barrage(server: Any, session: requests.Session) -> None:
    response = session.post(f"{server.url}/chatkit", json=create_request("words=2"), timeout=30)
    assert response.status_code == 200 and response.text.count("thread.item.updated") == 2
    assert server.proc.poll() is None
    assert server.worker_pids() == server.initial_workers  # no worker crashed or restarted
