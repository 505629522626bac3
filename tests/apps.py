"""Test servers and app factories shared by unit and integration tests.

``gunicorn 'tests.apps:gunicorn_app()'`` builds the same app for a real
gunicorn; it reads its settings from ``CHATKIT_TEST_*`` environment variables.
"""

from __future__ import annotations

import os
from typing import Any

from chatkit.types import UserMessageItem
from flask import Flask, current_app, g, jsonify, request
from flask_login import LoginManager, UserMixin, current_user, login_user

from flask_chatkit import ChatKit, RequestContext

from .memory_store import MemoryStore
from .word_server import WordServer


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


class ScriptedServer(WordServer):
    """:class:`WordServer` that records what it saw inside ``respond``.

    Tests assert on the contexts visible there (``/_test/observations``) and on
    ``cancelled``; the message text may also say ``fail=1``.
    """

    observations: list[dict[str, Any]]

    def __init__(self, store: Any, attachment_store: Any = None) -> None:
        super().__init__(store, attachment_store)
        self.observations = []

    def before_reply(
        self, options: dict[str, str], input: UserMessageItem | None, context: RequestContext
    ) -> None:
        if options.get("fail") == "1":
            raise RuntimeError("respond failed on purpose")
        self.observations.append(
            {
                "app": current_app.name,
                "path": request.path,
                "g_marker": g.get("marker"),
                "user": getattr(current_user, "id", None),
                "context_user": context.user_id,
                "locale": context.locale,
                "metadata": context.metadata,
                "attachments": [a.id for a in input.attachments] if input else [],
            }
        )


def create_test_app(store: Any = None, server_cls: Any = ScriptedServer, **config: Any) -> Flask:
    app = Flask("chatkit_test_app", instance_path=config.pop("instance_path", None))
    app.config.update(SECRET_KEY="test-secret", TESTING=True)
    app.config.update(config)
    login = LoginManager(app)

    @login.user_loader
    def load_user(user_id: str) -> User:
        return User(user_id)

    @app.post("/login/<user_id>")
    def login_view(user_id: str) -> Any:
        login_user(User(user_id))
        return jsonify(ok=True)

    @app.before_request
    def mark() -> None:
        g.marker = "set-in-before-request"

    if callable(store):  # a factory that needs the configured app (e.g. for db.engine)
        store = store(app)
    # store=None: the extension's default SQLAlchemyStore on CHATKIT_DATABASE_URL.
    chatkit = ChatKit(app, server_cls, store=store)

    @app.get("/_test/observations")
    def observations() -> Any:
        server = app.extensions["chatkit"].server
        return jsonify(observations=server.observations, cancelled=server.cancelled)

    app.config["_chatkit"] = chatkit
    return app


def gunicorn_app() -> Flask:
    """App factory for integration tests under a real gunicorn."""
    delay = float(os.environ.get("CHATKIT_TEST_STORE_DELAY", "0"))
    config: dict[str, Any] = {}
    for key, value in os.environ.items():
        if key.startswith("CHATKIT_") and not key.startswith("CHATKIT_TEST_"):
            config[key] = value
    for key in ("CHATKIT_HEARTBEAT_SECONDS", "CHATKIT_CANCEL_TIMEOUT"):
        if key in config:
            config[key] = float(config[key])
    store: Any = MemoryStore(delay=delay)
    if os.environ.get("CHATKIT_TEST_STORE") == "sql":
        store = None  # the extension's default SQLAlchemyStore on CHATKIT_DATABASE_URL
    if os.environ.get("CHATKIT_TEST_INSTANCE_PATH"):  # "another machine": its own folder
        config["instance_path"] = os.environ["CHATKIT_TEST_INSTANCE_PATH"]
    app = create_test_app(store=store, **config)
    if os.environ.get("CHATKIT_TEST_PROXY_FIX"):  # behind nginx (tests/test_nginx.py)
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    return app
