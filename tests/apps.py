"""Test servers and app factories shared by unit and integration tests.

``gunicorn 'tests.apps:gunicorn_app()'`` builds the same app for a real
gunicorn; it reads its settings from ``CHATKIT_TEST_*`` environment variables.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from chatkit.server import ChatKitServer
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemUpdatedEvent,
    ThreadMetadata,
    ThreadStreamEvent,
    UserMessageItem,
)
from flask import Flask, current_app, g, jsonify, request
from flask_login import LoginManager, UserMixin, current_user, login_user

from flask_chatkit import ChatKit, RequestContext

from .memory_store import MemoryStore


class User(UserMixin):
    def __init__(self, user_id: str) -> None:
        self.id = user_id


class ScriptedServer(ChatKitServer[RequestContext]):
    """Streams ``words`` deltas (``text`` says how many: "words=N delay=S").

    Records what it saw so tests can assert on it: the contexts visible inside
    ``respond`` and whether a cancellation reached it.
    """

    observations: list[dict[str, Any]]

    def __init__(self, store: Any, attachment_store: Any = None) -> None:
        super().__init__(store, attachment_store)
        self.observations = []
        self.cancelled = 0

    async def respond(
        self, thread: ThreadMetadata, input: UserMessageItem | None, context: RequestContext
    ) -> AsyncIterator[ThreadStreamEvent]:
        text = ""
        if input is not None:
            text = " ".join(c.text for c in input.content if getattr(c, "text", None))
        options = dict(part.split("=", 1) for part in text.split() if "=" in part)
        words = int(options.get("words", 3))
        delay = float(options.get("delay", 0))
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
        item = AssistantMessageItem(
            id=self.store.generate_item_id("message", thread, context),
            thread_id=thread.id,
            created_at=datetime.now(),
            content=[AssistantMessageContent(text="")],
        )
        yield ThreadItemAddedEvent(item=item)
        parts = []
        try:
            for index in range(words):
                if delay:
                    await asyncio.sleep(delay)
                word = f"w{index} "
                parts.append(word)
                yield ThreadItemUpdatedEvent(
                    item_id=item.id,
                    update=AssistantMessageContentPartTextDelta(content_index=0, delta=word),
                )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        item.content = [AssistantMessageContent(text="".join(parts))]
        yield ThreadItemDoneEvent(item=item)


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
    return create_test_app(store=store, **config)
