"""threads.create: the client learns a new thread's id only once the thread is stored.

(Unit tests through the test client; ``tests/reliability/test_new_thread_visible.py``
checks the same promise against a real gunicorn.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc

from flask_chatkit.storage.sql import SQLAlchemyStore

from .apps import create_test_app


class _FailsStoringUserMessage(SQLAlchemyStore):
    """Storing the first user message fails: the database went away, or a plain bug."""

    failure: BaseException | None = None

    async def add_thread_item(self, thread_id: str, item: Any, context: Any) -> None:
        if self.failure is not None and item.type == "user_message":
            raise self.failure
        await super().add_thread_item(thread_id, item, context)


def _create(client: Any) -> Any:
    body = {"type": "threads.create", "params": {"input": {
        "content": [{"type": "input_text", "text": "words=2"}],
        "attachments": [], "inference_options": {}}}}
    return client.post("/chatkit", data=json.dumps(body), content_type="application/json")


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (sa_exc.OperationalError("INSERT", {}, ConnectionError("server closed")), 503,
         "service_unavailable"),
        (RuntimeError("a bug in the store"), 500, "internal_error"),
    ],
)
def test_failure_before_the_user_message_is_stored_never_hands_out_the_id(
    tmp_path: Path, failure: BaseException, status: int, code: str
) -> None:
    store = _FailsStoringUserMessage(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    app = create_test_app(store=store, instance_path=str(tmp_path / "instance"))
    client = app.test_client()
    assert client.post("/login/ada").status_code == 200
    store.failure = failure
    response = _create(client)
    body = response.get_data(as_text=True)
    # A plain HTTP error saying so, not a 200 stream that starts with thread.created.
    assert response.status_code == status, body
    assert response.mimetype == "application/json"
    assert response.get_json()["error"]["code"] == code
    assert "thread.created" not in body and "thr_" not in body
    listed = client.post("/chatkit", json={"type": "threads.list", "params": {}}).get_json()
    assert listed["data"] == []  # and nothing was left behind
    store.failure = None
    ok = _create(client)
    assert ok.status_code == 200 and ok.mimetype == "text/event-stream"
    events = [json.loads(line[6:]) for line in ok.get_data(as_text=True).splitlines()
              if line.startswith("data: ")]
    assert [e["type"] for e in events[:2]] == ["thread.created", "thread.item.done"]
