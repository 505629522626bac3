"""The demo app through Flask's test client: login, the offline responder, the widget action."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from chatkit.types import (
    AssistantMessageItem,
    ErrorEvent,
    ProgressUpdateEvent,
    ThreadCreatedEvent,
    ThreadItemDoneEvent,
    ThreadUpdatedEvent,
    WidgetItem,
    WorkflowItem,
)
from flask import Flask
from flask.testing import FlaskClient

from example import create_app
from example.texts import long_answer
from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return create_app(
        {"TESTING": True, "SECRET_KEY": "test", "DEMO_WORD_DELAY": 0},
        instance_path=str(tmp_path / "instance"),
    )


def login(client: FlaskClient, username: str = "ada") -> None:
    client.get("/login")
    with client.session_transaction() as session:
        token = session["_csrf"]
    res = client.post("/login", data={"username": username, "csrf_token": token})
    assert res.status_code == 302, res.data


@pytest.fixture
def kit(app: Flask) -> ChatKitClient:
    client = app.test_client()
    login(client)
    return ChatKitClient(client)


def reply_text(events: list[Any]) -> str:
    done = [
        e.item
        for e in events
        if isinstance(e, ThreadItemDoneEvent) and isinstance(e.item, AssistantMessageItem)
    ]
    assert done, [e.type for e in events]
    return done[-1].content[0].text


def thread_id(events: list[Any]) -> str:
    return next(e.thread.id for e in events if isinstance(e, ThreadCreatedEvent))


def test_login_page_and_redirects(app: Flask) -> None:
    client = app.test_client()
    res = client.get("/")
    assert res.status_code == 302 and "/login" in res.headers["Location"]
    page = client.get("/login")
    assert b"passwords" in page.data
    bad = client.post("/login", data={"username": "ada", "csrf_token": "nope"})
    assert bad.status_code == 400
    login(client)
    index = client.get("/")
    assert index.status_code == 200
    assert b"<openai-chatkit" in index.data and b"/chatkit/console" in index.data
    assert client.get("/chatkit/console").status_code == 200


def test_login_rejects_bad_names_and_foreign_next(app: Flask) -> None:
    client = app.test_client()
    client.get("/login")
    with client.session_transaction() as session:
        token = session["_csrf"]
    assert client.post("/login", data={"username": "a b", "csrf_token": token}).status_code == 400
    res = client.post(
        "/login", data={"username": "ada", "csrf_token": token, "next": "//evil.example/"}
    )
    assert res.headers["Location"] == "/"


# Each of these leads a browser to another site if it lands in a Location header as is
# (browsers drop tabs and newlines, read "\\" as "/", and strip leading spaces).
OFFSITE_NEXT = [
    "//evil.example/",
    "/\t/evil.example",  # the form field next=/%09/evil.example
    "/\n/evil.example",
    "/\r\n/evil.example",
    "\t//evil.example",
    " //evil.example",
    "/\x00/evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "\\/evil.example",
    "///evil.example",
    "https://evil.example/",
    "http:/evil.example",
    "HTTPS:evil.example",
    "javascript:alert(1)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "evil.example",
    "/\u3000/evil.example",
]


def _offsite(location: str) -> bool:
    """Where a browser would go: anything but a path on this origin is offsite."""
    read = "".join(c for c in location if c > " " and c != "\x7f").replace("\\", "/")
    parts = urlsplit(read)
    return bool(parts.scheme or parts.netloc) or not read.startswith("/") or read.startswith("//")


@pytest.mark.parametrize("target", OFFSITE_NEXT)
def test_login_never_redirects_offsite(app: Flask, target: str) -> None:
    client = app.test_client()
    client.get("/login")
    with client.session_transaction() as session:
        token = session["_csrf"]
    res = client.post("/login", data={"username": "ada", "csrf_token": token, "next": target})
    assert res.status_code == 302
    assert res.headers["Location"] == "/", (target, res.headers["Location"])
    # once signed in, GET /login?next=... redirects too: same rule
    res = client.get("/login", query_string={"next": target})
    assert res.status_code == 302 and res.headers["Location"] == "/"
    assert not _offsite(res.headers["Location"])


@pytest.mark.parametrize(
    "target", ["/", "/chatkit/console", "/?thread=thr_1#top", "/a/b?next=//x"]
)
def test_login_keeps_same_site_next(app: Flask, target: str) -> None:
    client = app.test_client()
    client.get("/login")
    with client.session_transaction() as session:
        token = session["_csrf"]
    res = client.post("/login", data={"username": "ada", "csrf_token": token, "next": target})
    assert res.headers["Location"] == target


def test_logout_needs_post_and_the_csrf_token(app: Flask) -> None:
    client = app.test_client()
    login(client)
    # A cross-site <img src=/logout> or link: not a sign-out.
    assert client.get("/logout").status_code == 405
    assert client.get("/").status_code == 200
    # A cross-site form post carries the cookie but not the token.
    assert client.post("/logout").status_code == 400
    assert client.post("/logout", data={"csrf_token": "forged"}).status_code == 400
    assert client.get("/").status_code == 200
    page = client.get("/").get_data(as_text=True)
    with client.session_transaction() as session:
        token = session["_csrf"]
    assert f'name="csrf_token" value="{token}"' in page  # the page's own sign-out form
    res = client.post("/logout", data={"csrf_token": token})
    assert res.status_code == 302 and res.headers["Location"].endswith("/login")
    assert client.get("/").status_code == 302  # signed out


def test_reply_streams_and_remembers_history(kit: ChatKitClient) -> None:
    events = kit.create_thread("Hello there")
    assert any(isinstance(e, ProgressUpdateEvent) for e in events)
    assert any(
        isinstance(e, ThreadUpdatedEvent) and e.thread.title == "Hello there" for e in events
    )
    deltas = [e for e in events if e.type == "thread.item.updated"]
    assert len(deltas) > 10  # word by word
    first = reply_text(events)
    assert "**ada**" in first and "You said 1 message so far" in first
    tid = thread_id(events)

    second = reply_text(kit.add_user_message(tid, "And again"))
    assert "You said 2 messages so far" in second
    assert "Before this one you said: “Hello there”" in second
    assert kit.get_thread(tid).title == "Hello there"
    types = [i.type for i in kit.list_items(tid).data]
    assert types == ["user_message", "assistant_message"] * 2


def test_keywords_long_workflow_widget_and_fail(kit: ChatKitClient) -> None:
    events = kit.create_thread("a long workflow widget please")
    tid = thread_id(events)
    assert reply_text(events) == long_answer("a long workflow widget please")
    assert len(reply_text(events).split()) >= 180
    workflow = next(
        e.item for e in events if e.type == "thread.item.done" and e.item.type == "workflow"
    )
    assert isinstance(workflow, WorkflowItem)
    assert [t.status_indicator for t in workflow.workflow.tasks] == ["complete"] * 3
    widget = next(i for i in kit.list_items(tid).data if isinstance(i, WidgetItem))

    action = {"type": "demo.tell_more", "payload": {"topic": "streaming"}}
    pressed = kit.send(
        {
            "type": "threads.custom_action",
            "params": {"thread_id": tid, "item_id": widget.id, "action": action},
        }
    )
    assert "You pressed the widget's button" in reply_text(pressed)
    replaced = next(e for e in pressed if e.type == "thread.item.replaced")
    assert replaced.item.widget.model_dump()["children"][-1]["disabled"] is True

    failed = kit.add_user_message(tid, "please fail now")
    error = failed[-1]
    assert isinstance(error, ErrorEvent) and error.message == "The demo was asked to fail."
    # "belong" is not "long": keywords are whole words
    assert "long answer" not in reply_text(kit.add_user_message(tid, "where do I belong"))


def test_threads_are_per_user(app: Flask, kit: ChatKitClient) -> None:
    tid = thread_id(kit.create_thread("mine"))
    other = app.test_client()
    login(other, "bob")
    bob = ChatKitClient(other)
    assert bob.list_threads().data == []
    with pytest.raises(ChatKitHTTPError) as err:
        bob.get_thread(tid)
    assert err.value.status == 404


def test_openai_failure_falls_back_offline(
    kit: ChatKitClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import example.openai_agent as online

    async def broken(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise RuntimeError("no network")
        yield  # pragma: no cover

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setattr(online, "agent_events", broken)
    text = reply_text(kit.create_thread("Hi"))
    assert "The OpenAI call failed before answering" in text
    assert "You said 1 message so far" in text


def test_secret_key_is_generated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECRET_KEY", raising=False)
    first = create_app(instance_path=str(tmp_path))
    second = create_app(instance_path=str(tmp_path))
    assert first.config["SECRET_KEY"] == second.config["SECRET_KEY"]
    assert len(first.config["SECRET_KEY"]) == 64
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0
