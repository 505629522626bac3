"""The extension's wiring: factories, fail-fast configuration, custom contexts."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, abort

from flask_chatkit import ChatKit, RequestContext
from flask_chatkit.testing import ChatKitClient, ChatKitHTTPError

from .apps import ScriptedServer
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


def test_config_defaults_are_set_with_setdefault() -> None:
    app = bare_app(CHATKIT_HEARTBEAT_SECONDS=3)
    ChatKit(app, ScriptedServer, store=MemoryStore())
    assert app.config["CHATKIT_HEARTBEAT_SECONDS"] == 3
    assert app.config["CHATKIT_LOGIN_REQUIRED"] is True
    assert app.config["CHATKIT_MAX_PAGE_SIZE"] == 100
    assert app.config["CHATKIT_ON_DISCONNECT"] == "cancel"
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
    app = bare_app()
    ChatKit(app, ScriptedServer, store=MemoryStore())
    with pytest.raises(ChatKitHTTPError) as err:
        ChatKitClient(app.test_client()).list_threads()
    assert (err.value.status, err.value.code) == (401, "unauthorized")
    assert err.value.message


def test_anonymous_mode_without_secret_key_is_a_clear_500(caplog: Any) -> None:
    app = Flask(__name__)  # no SECRET_KEY
    app.config["CHATKIT_LOGIN_REQUIRED"] = False
    ChatKit(app, ScriptedServer, store=MemoryStore())
    response = app.test_client().post("/chatkit", json={"type": "threads.list", "params": {}})
    assert response.status_code == 500
    assert response.get_json()["error"]["code"] == "internal_error"
    assert any("secret_key" in (r.exc_text or "") + r.getMessage() for r in caplog.records)
