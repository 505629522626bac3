"""``items.feedback`` id lists: repeats dropped, the count capped, ownership in one query.

Before: 100,000 copies of one id were 100,000 sequential store lookups (35 s on
gunicorn, 53 s through the test client on SQLite) that kept the pool busy after
the client left.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from chatkit.types import ThreadItemDoneEvent
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import event

from flask_chatkit.testing import ChatKitClient
from flask_chatkit.web.checks import MAX_ITEM_IDS

from .apps import ScriptedServer, create_test_app
from .helpers import created_thread_id
from .test_endpoint import assert_json_error, post


class FeedbackServer(ScriptedServer):
    feedback: list[tuple[str, list[str], str]]

    def __init__(self, store: Any, attachment_store: Any = None) -> None:
        super().__init__(store, attachment_store)
        self.feedback = []

    async def add_feedback(
        self, thread_id: str, item_ids: list[str], feedback: Any, context: Any
    ) -> None:
        self.feedback.append((thread_id, list(item_ids), str(feedback)))


@pytest.fixture
def sql_app(tmp_path: Any) -> Flask:
    # The extension's own SQLAlchemyStore on a SQLite file.
    return create_test_app(
        server_cls=FeedbackServer,
        instance_path=str(tmp_path / "instance"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )


@pytest.fixture
def item_selects(sql_app: Flask) -> Iterator[list[str]]:
    """SQL statements that read the items table, as the store runs them."""
    statements: list[str] = []
    engine = sql_app.extensions["chatkit"].store.engine

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "chatkit_items" in statement:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield statements
    event.remove(engine, "before_cursor_execute", record)


def feedback(thread_id: str, item_ids: list[str]) -> dict[str, Any]:
    return {
        "type": "items.feedback",
        "params": {"thread_id": thread_id, "item_ids": item_ids, "kind": "positive"},
    }


def start_thread(client: FlaskClient, user: str = "alice") -> tuple[str, list[str]]:
    client.post(f"/login/{user}")
    events = ChatKitClient(client).create_thread("hi words=1")
    done = [e.item.id for e in events if isinstance(e, ThreadItemDoneEvent)]
    return created_thread_id(events), done


def test_repeated_ids_are_checked_once_and_passed_on_once(
    sql_app: Flask, item_selects: list[str]
) -> None:
    client = sql_app.test_client()
    thread_id, (user_id, reply_id) = start_thread(client)
    item_selects.clear()
    started = time.monotonic()
    response = post(client, feedback(thread_id, [reply_id] * 20_000 + [user_id, reply_id]))
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.get_data(as_text=True)
    assert sql_app.extensions["chatkit"].server.feedback == [
        (thread_id, [reply_id, user_id], "positive")
    ]
    assert len(item_selects) == 1  # one owner-scoped query for all the ids
    assert elapsed < 3.0


def test_the_reviews_100k_copies_are_refused_before_any_lookup(
    sql_app: Flask, item_selects: list[str]
) -> None:
    # The review's body: 100,000 copies of an SDK-style 8-hex-digit id (~1.5 MB) holds
    # more JSON values than a body of that size may hold.
    client = sql_app.test_client()
    thread_id, _ = start_thread(client)
    item_selects.clear()
    started = time.monotonic()
    response = post(client, feedback(thread_id, ["msg_0a1b2c3d"] * 100_000))
    assert_json_error(response, 413, "payload_too_large")
    assert time.monotonic() - started < 3.0
    assert item_selects == []
    assert sql_app.extensions["chatkit"].server.feedback == []


def test_100k_copies_of_a_real_id_cost_one_lookup(
    sql_app: Flask, item_selects: list[str]
) -> None:
    # Our ids are 128-bit (36 characters): 100,000 copies (~3.9 MB) stay within the
    # value budget, so they are de-duplicated before ChatKit sees them.
    client = sql_app.test_client()
    thread_id, (_, reply_id) = start_thread(client)
    item_selects.clear()
    started = time.monotonic()
    response = post(client, feedback(thread_id, [reply_id] * 100_000))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert time.monotonic() - started < 3.0
    assert len(item_selects) == 1
    assert sql_app.extensions["chatkit"].server.feedback == [(thread_id, [reply_id], "positive")]


def test_too_many_distinct_ids_is_400_before_any_lookup(
    sql_app: Flask, item_selects: list[str]
) -> None:
    client = sql_app.test_client()
    thread_id, _ = start_thread(client)
    item_selects.clear()
    ids = [f"msg_{n:06d}" for n in range(MAX_ITEM_IDS + 1)]
    error = assert_json_error(post(client, feedback(thread_id, ids)), 400, "invalid_request")
    assert str(MAX_ITEM_IDS) in error["message"]
    assert item_selects == []
    assert sql_app.extensions["chatkit"].server.feedback == []


def test_the_limit_itself_is_allowed_and_unknown_or_foreign_ids_are_404(
    sql_app: Flask, item_selects: list[str]
) -> None:
    client = sql_app.test_client()
    thread_id, (user_id, reply_id) = start_thread(client)
    bob = sql_app.test_client()
    bob_thread, (bob_item, _) = start_thread(bob, "bob")
    item_selects.clear()
    ids = [reply_id] + [f"msg_{n:06d}" for n in range(MAX_ITEM_IDS - 1)]
    error = assert_json_error(post(client, feedback(thread_id, ids)), 404, "not_found")
    assert "msg_000000" in error["message"]
    assert len(item_selects) == 1
    # Another user's item, even named alongside one's own, is not found.
    assert_json_error(post(client, feedback(thread_id, [user_id, bob_item])), 404, "not_found")
    assert_json_error(post(client, feedback(bob_thread, [bob_item])), 404, "not_found")
    assert sql_app.extensions["chatkit"].server.feedback == []
