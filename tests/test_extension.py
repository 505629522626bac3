"""The extension's wiring: factories, fail-fast configuration, custom contexts."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, abort

from flask_chatkit import ChatKit, RequestContext
from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError

from .apps import ScriptedServer, create_test_app
from .memory_store import MemoryStore


def bare_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(SECRET_KEY="x", **config)
    return app


def test_factory_pattern_two_apps_one_extension() -> None:
    chatkit = ChatKit(server_cls=ScriptedServer, store=None)
    apps = [bare_app(CHATKIT_LOGIN_REQUIRED=False), bare_app(CHATKIT_LOGIN_REQUIRED=False)]
    stores = [MemoryStore(), MemoryStore()]
    for app, store in zip(apps, stores, strict=True):
        chatkit.store = store
        chatkit.init_app(app)
    servers = [app.extensions["chatkit"].server for app in apps]
    assert servers[0] is not servers[1]
    assert [s.store for s in servers] == stores
    kit = ChatKitClient(apps[0].test_client())
    kit.create_thread("only in app one words=1")
    assert len(stores[0].threads) == 1 and stores[1].threads == {}
    assert ChatKitClient(apps[1].test_client()).list_threads().data == []


def test_registering_twice_fails_fast() -> None:
    app = bare_app()
    ChatKit(app, ScriptedServer, store=MemoryStore())
    with pytest.raises(RuntimeError, match="already registered"):
        ChatKit(app, ScriptedServer, store=MemoryStore())


@pytest.mark.parametrize("bad", [None, object, "ScriptedServer", ScriptedServer.respond])
def test_bad_server_fails_fast(bad: Any) -> None:
    with pytest.raises(TypeError, match="ChatKitServer"):
        ChatKit(bare_app(), bad, store=MemoryStore())


def test_bad_config_fails_fast() -> None:
    with pytest.raises(ValueError, match="CHATKIT_ON_DISCONNECT"):
        ChatKit(bare_app(CHATKIT_ON_DISCONNECT="ignore"), ScriptedServer, store=MemoryStore())
    with pytest.raises(ValueError, match="CHATKIT_MAX_PAGE_SIZE"):
        ChatKit(bare_app(CHATKIT_MAX_PAGE_SIZE=0), ScriptedServer, store=MemoryStore())
    with pytest.raises(ValueError, match="CHATKIT_LOOP must be 'hub' or 'thread'"):
        ChatKit(bare_app(CHATKIT_LOOP="greenlet"), ScriptedServer, store=MemoryStore())


def test_config_defaults_are_set_with_setdefault() -> None:
    app = bare_app(CHATKIT_HEARTBEAT_SECONDS=3)
    ChatKit(app, ScriptedServer, store=MemoryStore())
    assert app.config["CHATKIT_HEARTBEAT_SECONDS"] == 3
    assert app.config["CHATKIT_LOGIN_REQUIRED"] is True
    assert app.config["CHATKIT_MAX_PAGE_SIZE"] == 100
    assert app.config["CHATKIT_ON_DISCONNECT"] == "cancel"
    assert app.config["CHATKIT_LOOP"] == "hub"
    assert app.config["CHATKIT_URL_PREFIX"] == "/chatkit"


def test_server_instance_is_accepted_with_its_own_store() -> None:
    store = MemoryStore()
    app = bare_app(CHATKIT_LOGIN_REQUIRED=False)
    ChatKit(app, ScriptedServer(store))
    ChatKitClient(app.test_client()).create_thread("hi words=1")
    assert len(store.threads) == 1


def test_url_prefix() -> None:
    app = bare_app(CHATKIT_LOGIN_REQUIRED=False, CHATKIT_URL_PREFIX="/api/chat/")
    ChatKit(app, ScriptedServer, store=MemoryStore())
    assert app.test_client().post("/chatkit", json={}).status_code == 404
    kit = ChatKitClient(app.test_client(), path="/api/chat")
    assert kit.list_threads().data == []


def test_anonymous_users_get_a_stable_session_id() -> None:
    store = MemoryStore()
    app = bare_app(CHATKIT_LOGIN_REQUIRED=False)
    ChatKit(app, ScriptedServer, store=store)
    first, second = ChatKitClient(app.test_client()), ChatKitClient(app.test_client())
    first.create_thread("mine words=0")
    first.create_thread("mine too words=0")
    assert len(first.list_threads().data) == 2
    assert second.list_threads().data == []  # another browser, another id
    owners = {owner for owner, _ in store.threads.values()}
    assert len(owners) == 1 and next(iter(owners)).startswith("anon_")


def test_custom_context_loader_owns_authentication() -> None:
    app = bare_app()  # CHATKIT_LOGIN_REQUIRED stays True: not applied to a custom loader
    chatkit = ChatKit(app, ScriptedServer, store=MemoryStore())
    seen: list[Any] = []

    @chatkit.context_loader
    def load(request: Any, metadata: dict[str, Any]) -> RequestContext:
        token = request.headers.get("X-Token")
        if token is None:
            abort(401)
        if token == "banned":
            abort(403, "banned user")
        seen.append(metadata)
        return RequestContext(user_id=f"token-{token}", metadata=metadata)

    client = app.test_client()
    response = client.post("/chatkit", json={"type": "threads.list", "params": {}})
    assert response.status_code == 401
    assert response.get_json()["error"]["code"] == "unauthorized"
    response = client.post(
        "/chatkit", json={"type": "threads.list", "params": {}}, headers={"X-Token": "banned"}
    )
    assert response.status_code == 403
    assert response.get_json()["error"] == {"code": "forbidden", "message": "banned user"}
    client.environ_base["HTTP_X_TOKEN"] = "t1"
    kit = ChatKitClient(client)
    kit.send({"type": "threads.list", "params": {}, "metadata": {"k": "v"}})
    assert seen == [{"k": "v"}]
    events = kit.create_thread("hi words=1")
    assert events[0].type == "thread.created"
    assert app.extensions["chatkit"].server.observations[-1]["context_user"] == "token-t1"


def test_chatkit_http_error_carries_status_code_message() -> None:
    app = create_test_app(store=MemoryStore())
    with pytest.raises(ChatKitHTTPError) as err:
        ChatKitClient(app.test_client()).list_threads()
    assert (err.value.status, err.value.code) == (401, "unauthorized")
    assert err.value.message


def test_create_tables_on_first_use_unless_disabled(tmp_path: Any) -> None:
    import sqlalchemy as sa

    for create, expected in (
        (
            True,
            {"chatkit_threads", "chatkit_items", "chatkit_attachments", "chatkit_schema_version"},
        ),
        (False, set()),
    ):
        db = tmp_path / f"create-{create}.sqlite3"
        app = bare_app(
            CHATKIT_LOGIN_REQUIRED=False,
            CHATKIT_DATABASE_URL=f"sqlite:///{db}",
            CHATKIT_CREATE_TABLES=create,
        )
        ChatKit(app, ScriptedServer)
        assert (
            not db.exists()
            or sa.inspect(sa.create_engine(f"sqlite:///{db}")).get_table_names() == []
        )
        response = app.test_client().post("/chatkit", json={"type": "threads.list", "params": {}})
        tables = set(sa.inspect(sa.create_engine(f"sqlite:///{db}")).get_table_names())
        assert tables == expected
        # Without tables: a JSON 500 `misconfigured` (tests/test_misconfig.py), no traceback.
        assert response.status_code == (200 if create else 500)


def test_default_store_lives_in_instance_path(tmp_path: Any) -> None:
    app = Flask(__name__, instance_path=str(tmp_path / "inst"))
    app.config.update(SECRET_KEY="x", CHATKIT_LOGIN_REQUIRED=False)
    ChatKit(app, ScriptedServer)
    ChatKitClient(app.test_client()).create_thread("persist me words=1")
    assert (tmp_path / "inst" / "chatkit.sqlite3").exists()


def test_console_is_off_by_default_and_follows_the_prefix() -> None:
    app = bare_app(CHATKIT_LOGIN_REQUIRED=False)
    ChatKit(app, ScriptedServer, store=MemoryStore())
    assert app.test_client().get("/chatkit/console").status_code == 404
    app = bare_app(CHATKIT_CONSOLE=True, CHATKIT_URL_PREFIX="/api/kit")
    ChatKit(app, ScriptedServer, store=MemoryStore())
    page = app.test_client().get("/api/kit/console")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert b'content="/api/kit"' in page.data


@pytest.mark.parametrize("debug", [True, False])
def test_console_is_on_under_app_debug(debug: bool) -> None:
    # The documented default: CHATKIT_CONSOLE unset, the console follows app.debug
    # (read once, at init_app).
    app = bare_app(CHATKIT_LOGIN_REQUIRED=False)
    app.debug = debug
    assert "CHATKIT_CONSOLE" not in app.config
    ChatKit(app, ScriptedServer, store=MemoryStore())
    page = app.test_client().get("/chatkit/console")
    if debug:
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert b'content="/chatkit"' in page.data
    else:
        assert page.status_code == 404


def test_console_files_are_not_served_while_the_console_is_off() -> None:
    app = bare_app(CHATKIT_LOGIN_REQUIRED=False)
    ChatKit(app, ScriptedServer, store=MemoryStore())
    client = app.test_client()
    for path in ("/chatkit/static/console.html", "/chatkit/static/", "/chatkit/console"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.get_json()["error"]["code"] == "not_found"
        assert b"<html" not in response.data.lower()
    # On, the console is the /console page only; its file is not a second route.
    app = bare_app(CHATKIT_CONSOLE=True)
    ChatKit(app, ScriptedServer, store=MemoryStore())
    assert app.test_client().get("/chatkit/console").status_code == 200
    assert app.test_client().get("/chatkit/static/console.html").status_code == 404


def test_cancel_timeout_bounds_the_wait_for_a_slow_cancellation(caplog: Any) -> None:
    import asyncio
    import time

    class SlowToCancel(ScriptedServer):
        async def handle_stream_cancelled(self, thread: Any, pending: Any, context: Any) -> None:
            await asyncio.sleep(5)  # e.g. a store that hangs while saving the partial reply

    app = bare_app(CHATKIT_LOGIN_REQUIRED=False, CHATKIT_CANCEL_TIMEOUT=0.3)
    ChatKit(app, SlowToCancel, store=MemoryStore())
    response = app.test_client().post(
        "/chatkit",
        json={
            "type": "threads.create",
            "params": {"input": ChatKitClient._input("words=50 delay=0.05")},
        },
        buffered=False,
    )
    chunks = iter(response.response)
    while b"thread.item.updated" not in next(chunks):
        pass
    started = time.monotonic()
    response.close()  # what a WSGI server does when the client is gone
    assert time.monotonic() - started < 2
    assert any("CHATKIT_CANCEL_TIMEOUT" in r.getMessage() for r in caplog.records)
