"""The ``ChatKit`` Flask extension: configuration, wiring, and the blueprint."""

from __future__ import annotations

import os
from typing import Any

from chatkit.server import ChatKitServer
from chatkit.store import AttachmentStore, Store
from flask import Flask

from .bridge.lifecycle import WorkerLifecycle
from .bridge.loop import LoopThread
from .config import read_settings
from .context import ContextLoader
from .state import ChatKitState
from .web.endpoint import create_blueprint
from .web.observe import load_telemetry

# One asyncio loop per worker process, shared by every app in it.
_LOOP_THREAD = LoopThread()
# Under gunicorn, a stopping worker cancels (and so saves) its open streams in time.
_LIFECYCLE = WorkerLifecycle(_LOOP_THREAD)


class ChatKit:
    """Serve a ChatKit server from a Flask app.

    ``ChatKit(app, MyServer)`` or, for app factories,
    ``chatkit = ChatKit(server_cls=MyServer)`` then ``chatkit.init_app(app)``
    (one object may serve several apps; each gets its own server and store).
    ``server_cls`` may also be an already built ``ChatKitServer`` instance, whose
    own store is then used.
    """

    def __init__(
        self,
        app: Flask | None = None,
        server_cls: type[ChatKitServer[Any]] | ChatKitServer[Any] | None = None,
        *,
        store: Store[Any] | None = None,
        attachment_store: AttachmentStore[Any] | None = None,
    ) -> None:
        self.server_cls = server_cls
        self.store = store
        self.attachment_store = attachment_store
        self.custom_context_loader: ContextLoader | None = None
        if app is not None:
            self.init_app(app)

    def context_loader(self, loader: ContextLoader) -> ContextLoader:
        """Decorator: build the ChatKit context yourself from ``(request, metadata)``.

        The loader owns authentication (``CHATKIT_LOGIN_REQUIRED`` is not applied
        on top of it); ``abort(401)`` inside it still yields the JSON error shape.
        """
        self.custom_context_loader = loader
        return loader

    def init_app(self, app: Flask) -> None:
        if "chatkit" in app.extensions:
            raise RuntimeError("flask-chatkit is already registered on this app.")
        self._check_server_cls()
        settings = read_settings(app)
        _LIFECYCLE.watch(settings.cancel_timeout)
        server, store, attachment_store = self._build_server(app, settings.database_url)
        telemetry = load_telemetry(settings)  # None unless OpenTelemetry is configured
        if telemetry is not None:  # ChatKit's store calls get timed
            server.store = telemetry.wrap_store(server.store)
        app.extensions["chatkit"] = ChatKitState(
            extension=self,
            server=server,
            store=store,
            attachment_store=attachment_store,
            settings=settings,
            loop_thread=_LOOP_THREAD,
            telemetry=telemetry,
        )
        app.register_blueprint(
            create_blueprint(console=settings.console, health=settings.health),
            url_prefix=settings.url_prefix or None,
        )
        from .cli import chatkit_cli

        if "chatkit" not in app.cli.commands:
            app.cli.add_command(chatkit_cli)

    def _check_server_cls(self) -> None:
        server_cls = self.server_cls
        if server_cls is None:
            raise TypeError(
                "ChatKit needs a server: ChatKit(app, MyServer) where MyServer subclasses "
                "chatkit.server.ChatKitServer."
            )
        if isinstance(server_cls, ChatKitServer):
            return
        if not (isinstance(server_cls, type) and issubclass(server_cls, ChatKitServer)):
            raise TypeError(
                f"server_cls must be a chatkit.server.ChatKitServer subclass or instance, "
                f"got {server_cls!r}."
            )

    def _build_server(
        self, app: Flask, database_url: str
    ) -> tuple[ChatKitServer[Any], Store[Any], AttachmentStore[Any] | None]:
        if isinstance(self.server_cls, ChatKitServer):
            server = self.server_cls
            return server, server.store, server.attachment_store
        assert self.server_cls is not None
        store = self.store or self._default_store(app, database_url)
        attachment_store = self.attachment_store or self._default_attachment_store(app, store)
        self._link_attachment_cleanup(app, store, attachment_store)
        return self.server_cls(store, attachment_store), store, attachment_store

    @staticmethod
    def _link_attachment_cleanup(
        app: Flask, store: Store[Any], attachment_store: AttachmentStore[Any]
    ) -> None:
        """Deleting or pruning a thread in SQL also removes its attachment files."""
        from .attachments import FileAttachmentStore
        from .storage.sql import SQLAlchemyStore

        if (
            isinstance(store, SQLAlchemyStore)
            and isinstance(attachment_store, FileAttachmentStore)
            and store.on_attachments_deleted is None
        ):
            store.on_attachments_deleted = attachment_store.cleanup_for(app)

    @staticmethod
    def _default_store(app: Flask, database_url: str) -> Store[Any]:
        from .storage.sql import SQLAlchemyStore

        if database_url.startswith("sqlite:///") and app.config["CHATKIT_DATABASE_URL"] is None:
            os.makedirs(app.instance_path, exist_ok=True)
        return SQLAlchemyStore(database_url)

    @staticmethod
    def _default_attachment_store(app: Flask, store: Store[Any]) -> AttachmentStore[Any]:
        from .attachments import default_attachment_store

        return default_attachment_store(app, store)
