"""threads.create: one store contract, so every thread id a client receives exists.

``save_thread`` has persisted the thread when it returns, and ChatKit sends
``thread.created`` only after it. A failure before that leaves nothing behind and is
a plain HTTP error; a failure after it leaves the (empty) thread the client was told
about. (Unit tests through the test client; ``tests/reliability/test_new_thread_visible.py``
checks the read-after-created promise against a real gunicorn.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc

from flask_chatkit.storage.sql import SQLAlchemyStore

from .apps import create_test_app
from .helpers import login_as, sse_data

OUTAGE = sa_exc.OperationalError("INSERT", {}, ConnectionError("server closed"))


class _FailingStore(SQLAlchemyStore):
    """Saving the thread, or storing its first user message, fails on demand."""

    fail_thread: BaseException | None = None
    fail_message: BaseException | None = None

    async def save_thread(self, thread: Any, context: Any) -> None:
        if self.fail_thread is not None:
            raise self.fail_thread
        await super().save_thread(thread, context)

    async def add_thread_item(self, thread_id: str, item: Any, context: Any) -> None:
        if self.fail_message is not None and item.type == "user_message":
            raise self.fail_message
        await super().add_thread_item(thread_id, item, context)


def _create(client: Any) -> Any:
    body = {"type": "threads.create", "params": {"input": {
        "content": [{"type": "input_text", "text": "words=2"}],
        "attachments": [], "inference_options": {}}}}  # fmt: skip
    return client.post("/chatkit", data=json.dumps(body), content_type="application/json")


def _events(response: Any) -> list[dict[str, Any]]:
    return sse_data(response.get_data())


@pytest.fixture
def setup(tmp_path: Path) -> tuple[_FailingStore, Any]:
    store = _FailingStore(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    app = create_test_app(store=store, instance_path=str(tmp_path / "instance"))
    return store, login_as(app, "ada").client


def _listed(client: Any) -> list[str]:
    page = client.post("/chatkit", json={"type": "threads.list", "params": {}}).get_json()
    return [t["id"] for t in page["data"]]


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [(OUTAGE, 503, "service_unavailable"), (RuntimeError("a bug"), 500, "internal_error")],
)
def test_a_failed_thread_save_is_a_plain_error_and_leaves_nothing(
    setup: tuple[_FailingStore, Any], failure: BaseException, status: int, code: str
) -> None:
    store, client = setup
    store.fail_thread = failure
    response = _create(client)
    body = response.get_data(as_text=True)
    assert response.status_code == status, body
    assert response.mimetype == "application/json"
    assert response.get_json()["error"]["code"] == code
    assert "thread.created" not in body and "thr_" not in body
    assert _listed(client) == []


def test_thread_created_goes_out_at_once_and_its_thread_stays_if_the_message_fails(
    setup: tuple[_FailingStore, Any],
) -> None:
    store, client = setup
    store.fail_message = OUTAGE
    response = _create(client)
    events = _events(response)
    # Not held back: the stream starts with thread.created, then ends with an error.
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert events[0]["type"] == "thread.created"
    assert events[-1]["type"] == "error"
    # The id the client received names a thread that exists (empty).
    assert _listed(client) == [events[0]["thread"]["id"]]

    store.fail_message = None
    ok = _events(_create(client))
    assert [e["type"] for e in ok[:2]] == ["thread.created", "thread.item.done"]
    assert _listed(client)[0] == ok[0]["thread"]["id"]
