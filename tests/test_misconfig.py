"""A wrong set-up is a JSON 500 ``misconfigured`` plus ONE log line naming the fix."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_login import LoginManager, login_user

from flask_chatkit import ChatKit, RequestContext, SQLAlchemyStore
from flask_chatkit.testing import ChatKitClient

from .apps import ScriptedServer, User
from .memory_store import MemoryStore

LIST = {"type": "threads.list", "params": {}}


@pytest.fixture(autouse=True)
def _instance_in_tmp(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def make_app() -> Flask:
    return Flask("misconfig_app", instance_path=str(Path.cwd() / "instance"))


def post_list(app: Flask, times: int = 3) -> list[Any]:
    client = app.test_client()
    return [client.post("/chatkit", json=LIST) for _ in range(times)]


def misconfig_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "flask_chatkit" and r.levelno == logging.ERROR
    ]


def assert_misconfigured(
    responses: list[Any], caplog: pytest.LogCaptureFixture, *fix_words: str
) -> str:
    for response in responses:
        assert response.status_code == 500
        body = response.get_json()
        assert body["error"]["code"] == "misconfigured"
        assert "Traceback" not in response.get_data(as_text=True)
    logs = misconfig_logs(caplog)
    assert len(logs) == 1, logs  # once, however many requests hit it
    assert logs[0].startswith("flask-chatkit is misconfigured:")
    for word in fix_words:
        assert word in logs[0].split("Fix:", 1)[1]
    return logs[0]


@pytest.mark.parametrize("login_required", [True, False])
def test_login_manager_without_user_loader(
    caplog: pytest.LogCaptureFixture, login_required: bool
) -> None:
    app = make_app()
    app.config.update(SECRET_KEY="x", CHATKIT_LOGIN_REQUIRED=login_required)
    LoginManager(app)
    ChatKit(app, ScriptedServer, store=MemoryStore())
    assert_misconfigured(post_list(app), caplog, "@login_manager.user_loader")


def test_user_loader_registered_after_chatkit_is_fine() -> None:
    """The order of the set-up lines does not matter: checks run at the first request."""
    app = make_app()
    app.config.update(SECRET_KEY="x")
    login = LoginManager(app)
    ChatKit(app, ScriptedServer, store=MemoryStore())
    login.user_loader(User)

    @app.post("/login")
    def sign_in() -> str:
        login_user(User("ann"))
        return "ok"

    client = app.test_client()
    refused = client.post("/chatkit", json=LIST)  # not signed in yet: the JSON 401
    assert refused.status_code == 401
    assert refused.get_json()["error"]["code"] == "unauthorized"
    assert client.post("/login").status_code == 200
    kit = ChatKitClient(client)
    assert kit.list_threads().data == []
    created = [e.thread.id for e in kit.create_thread("words=1") if e.type == "thread.created"]
    # The loader registered after ChatKit is the one in use: ann's own threads.
    assert [t.id for t in kit.list_threads().data] == created


def test_no_login_manager_while_login_is_required(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    app.config.update(SECRET_KEY="x")
    ChatKit(app, ScriptedServer, store=MemoryStore())
    line = assert_misconfigured(post_list(app), caplog, "LoginManager(app)")
    assert "CHATKIT_LOGIN_REQUIRED" in line and "context_loader" in line


def test_custom_context_loader_needs_no_login_manager() -> None:
    app = make_app()
    chatkit = ChatKit(app, ScriptedServer, store=MemoryStore())

    loaded: list[str] = []

    @chatkit.context_loader
    def load(request: Any, metadata: dict[str, Any]) -> RequestContext:
        user = request.headers.get("X-Token-User", "nobody")
        loaded.append(user)
        return RequestContext(user_id=user)

    # Two clients with no session at all: who they are comes from the loader only.
    def client_as(user: str) -> ChatKitClient:
        client = app.test_client()
        client.environ_base["HTTP_X_TOKEN_USER"] = user  # sent on every request
        return ChatKitClient(client)

    tom, una = client_as("tom"), client_as("una")
    created = [e.thread.id for e in tom.create_thread("words=1") if e.type == "thread.created"]
    assert [t.id for t in tom.list_threads().data] == created
    assert una.list_threads().data == []  # the loader's user_id scopes the store
    assert loaded and set(loaded) == {"tom", "una"}


def test_anonymous_mode_without_secret_key(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()  # no SECRET_KEY
    app.config["CHATKIT_LOGIN_REQUIRED"] = False
    ChatKit(app, ScriptedServer, store=MemoryStore())
    line = assert_misconfigured(post_list(app), caplog, "app.secret_key")
    assert "CHATKIT_LOGIN_REQUIRED is False" in line


def test_attachment_routes_report_it_too(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    app.config["CHATKIT_LOGIN_REQUIRED"] = False
    ChatKit(app, ScriptedServer, store=MemoryStore())
    client = app.test_client()
    responses = [
        client.post("/chatkit", json=LIST),
        client.get("/chatkit/attachments/atc_x/content"),
    ]
    assert_misconfigured(responses, caplog, "app.secret_key")


def test_create_tables_off_without_tables(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    url = f"sqlite:///{tmp_path / 'empty.sqlite3'}"
    app = make_app()
    app.config.update(SECRET_KEY="x", CHATKIT_LOGIN_REQUIRED=False, CHATKIT_CREATE_TABLES=False)
    store = SQLAlchemyStore(url)
    ChatKit(app, ScriptedServer, store=store)
    line = assert_misconfigured(post_list(app), caplog, "flask chatkit init-db")
    assert "chatkit_threads" in line and "empty.sqlite3" in line
    # Once the tables exist (e.g. `flask chatkit init-db` ran), the same server works.
    store.create_all()
    response = app.test_client().post("/chatkit", json=LIST)
    assert response.status_code == 200, response.get_json()
    assert set(sa.inspect(store.engine).get_table_names()) >= {"chatkit_threads"}
