"""Flask-Limiter on the ChatKit endpoint: per-user message limits, JSON 429 + Retry-After.

The real Flask-Limiter (memory storage) under the test client, and once under a
real ``gunicorn -k gevent``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from chatkit.types import ThreadCreatedEvent
from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import current_user

from flask_chatkit import chatkit_request_type, is_message_request
from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError

from .apps import create_test_app
from .gunicorn import start_gunicorn
from .helpers import login_as
from .http_client import create_request, logged_in_session
from .memory_store import MemoryStore

MESSAGES_PER_MINUTE = 20


def user_key() -> str:
    """One bucket per signed-in user (the remote address for anonymous callers)."""
    user_id: str | None = current_user.get_id()
    return f"user:{user_id}" if user_id else get_remote_address()


def limited_app(headers_enabled: bool = False, **config: Any) -> Flask:
    """The README's recipe: 20 messages a minute per ``current_user`` on ChatKit's blueprint."""
    app = create_test_app(store=MemoryStore(), **config)
    limiter = Limiter(
        get_remote_address, app=app, storage_uri="memory://", headers_enabled=headers_enabled
    )
    limiter.limit(
        f"{MESSAGES_PER_MINUTE}/minute",
        key_func=user_key,
        exempt_when=lambda: not is_message_request(),
    )(app.blueprints["chatkit"])
    return app


def gunicorn_limited_app() -> Flask:
    return limited_app(headers_enabled=True)


def thread_of(events: list[Any]) -> str:
    return next(e.thread.id for e in events if isinstance(e, ThreadCreatedEvent))


@pytest.mark.parametrize("headers_enabled", [False, True])
def test_messages_per_user_are_limited_with_json_429(headers_enabled: bool) -> None:
    app = limited_app(headers_enabled=headers_enabled)
    alice, bob = login_as(app, "alice"), login_as(app, "bob")
    thread_id = thread_of(alice.create_thread("first words=1"))
    for n in range(2, MESSAGES_PER_MINUTE + 1):
        alice.add_user_message(thread_id, f"message {n} words=1")

    response = alice.client.post(
        "/chatkit",
        json={
            "type": "threads.add_user_message",
            "params": {"thread_id": thread_id, "input": ChatKitClient._input("one too many")},
        },
    )
    assert response.status_code == 429
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert error["code"] == "rate_limited"
    assert "20 per 1 minute" in error["message"]
    retry_after = int(response.headers["Retry-After"])
    # Flask-Limiter's headers give the exact reset; without them, the whole window.
    assert (0 < retry_after <= 60) if headers_enabled else retry_after == 60
    with pytest.raises(ChatKitHTTPError) as err:
        alice.create_thread("a new thread is a message too")
    assert (err.value.status, err.value.code) == (429, "rate_limited")

    # Reads are not messages: still served. Nothing was lost or half-written.
    items = alice.list_items(thread_id, limit=100).data
    assert [i.type for i in items].count("user_message") == MESSAGES_PER_MINUTE
    assert len(alice.list_threads().data) == 1
    # The limit is per user: bob is untouched.
    assert thread_of(bob.create_thread("bob's first words=1"))


def test_limit_hook_reads_the_body_once_and_errors_keep_their_shape() -> None:
    app = limited_app(CHATKIT_MAX_REQUEST_BYTES=2048)
    alice = login_as(app, "alice")
    # exempt_when read the body first: the endpoint still serves the same bytes.
    assert thread_of(alice.create_thread("hello words=1"))
    too_big = alice.client.post(
        "/chatkit",
        json={"type": "threads.create", "params": {"input": ChatKitClient._input("x" * 4096)}},
    )
    assert too_big.status_code == 413
    assert too_big.get_json()["error"]["code"] == "payload_too_large"
    not_json = alice.client.post("/chatkit", data=b"{nope", content_type="application/json")
    assert not_json.status_code == 400
    with pytest.raises(ChatKitHTTPError) as err:
        alice.send({"type": "threads.nope", "params": {}})
    assert err.value.status == 400


def test_request_type_only_names_posts_to_the_endpoint() -> None:
    app = limited_app()
    with app.test_request_context("/chatkit", method="POST", json={"type": "threads.list"}):
        assert chatkit_request_type() == "threads.list"
        assert not is_message_request()
    with app.test_request_context("/chatkit", method="POST", json={"type": "threads.create"}):
        assert is_message_request()
    with app.test_request_context("/chatkit", method="POST", json=["threads.create"]):
        assert chatkit_request_type() is None
    with app.test_request_context("/chatkit", method="GET"):
        assert chatkit_request_type() is None
    with app.test_request_context("/chatkit/attachments", method="POST", json={"type": "x"}):
        assert chatkit_request_type() is None


@pytest.mark.integration
def test_limit_under_real_gunicorn(tmp_path: Path) -> None:
    with start_gunicorn(tmp_path, "tests.test_rate_limit:gunicorn_limited_app()") as server:
        # The worker may still be importing the app under load: a generous first wait.
        requests.get(f"{server.url}/login/warm-up", timeout=60).close()
        session = logged_in_session(server.url, "carol")
        statuses = []
        for n in range(MESSAGES_PER_MINUTE + 2):
            res = session.post(
                f"{server.url}/chatkit", json=create_request(f"msg {n} words=1"), timeout=30
            )
            statuses.append(res.status_code)
            last = res
            res.close()
        assert statuses == [200] * MESSAGES_PER_MINUTE + [429, 429], statuses
        assert last.json()["error"]["code"] == "rate_limited"
        assert 0 < int(last.headers["Retry-After"]) <= 60
        assert last.headers["X-RateLimit-Limit"] == str(MESSAGES_PER_MINUTE)
        # Listing is not limited, and the server keeps serving other users.
        listed = session.post(
            f"{server.url}/chatkit", json={"type": "threads.list", "params": {}}, timeout=30
        )
        assert listed.status_code == 200
        assert len(listed.json()["data"]) == MESSAGES_PER_MINUTE
        other = logged_in_session(server.url, "dave")
        ok = other.post(f"{server.url}/chatkit", json=create_request("hi words=1"), timeout=30)
        assert ok.status_code == 200
        assert "Traceback" not in server.log()
