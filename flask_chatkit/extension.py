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
        """Register flask-chatkit on ``app``: read its config, build the server and stores.

        Every key below is read once, here, with ``app.config.setdefault`` (so set them
        before calling this); a bad value raises :class:`ValueError`. The documentation's
        configuration page gives each key's type, default and meaning.

        - ``CHATKIT_URL_PREFIX``: where the blueprint is mounted (``"/chatkit"``).
        - ``CHATKIT_DATABASE_URL``: the default store's SQLAlchemy URL (SQLite in
          ``app.instance_path``); unused when a ``store`` was given.
        - ``CHATKIT_LOGIN_REQUIRED``: 401 without a Flask-Login user (``True``).
        - ``CHATKIT_ALLOWED_ORIGINS``: origins besides the app's own that may call (``[]``).
        - ``CHATKIT_PUBLIC_URL``: trusted base of absolute URLs handed to clients.
        - ``CHATKIT_CONSOLE``: serve the protocol console (``False``; on with ``app.debug``).
        - ``CHATKIT_HEALTH``: serve ``<prefix>/health`` (``True``).
        - ``CHATKIT_MAX_REQUEST_BYTES``: request body limit (4 MiB; 413).
        - ``CHATKIT_MAX_METADATA_BYTES``: serialized ``metadata`` limit (16 KiB; 413).
        - ``CHATKIT_MAX_PAGE_SIZE``: page ``limit`` clamp (100).
        - ``CHATKIT_BODY_TIMEOUT``: seconds to receive a JSON body (30; 408).
        - ``CHATKIT_MAX_STREAMS_PER_USER``: open streams per user and worker (20; 429).
        - ``CHATKIT_HEARTBEAT_SECONDS``: ``: ping`` after this much silence (15; 0 = off).
        - ``CHATKIT_ON_DISCONNECT``: ``"cancel"`` (default) or ``"finish"`` a gone client's reply.
        - ``CHATKIT_CANCEL_TIMEOUT``: seconds a cancelled reply gets to save (10).
        - ``CHATKIT_CHECKPOINT_SECONDS``: save a streaming reply this often (2; 0 = off).
        - ``CHATKIT_LOOP``: under gevent, the asyncio loop as a greenlet on the hub
          (``"hub"``) or on a native thread (``"thread"``); one loop per process, so
          ``"thread"`` from any app of the process wins.
        - ``CHATKIT_CREATE_TABLES``: create the store's tables on first use (``True``).
        - ``CHATKIT_ATTACHMENTS_DIR``: attachment files on disk (``instance/chatkit-attachments``).
        - ``CHATKIT_ATTACHMENTS_URL``: ``s3://bucket/prefix`` for S3 instead of disk.
        - ``CHATKIT_MAX_ATTACHMENT_BYTES``: per-file limit (20 MiB; 413).
        - ``CHATKIT_MAX_PENDING_ATTACHMENT_BYTES``: a user's uploaded, unsent bytes (256 MiB; 413).
        - ``CHATKIT_ALLOWED_MIME_TYPES``: accepted attachment types (images, PDF, text; 415).
        - ``CHATKIT_OTEL_RECORD_OWNER``: the owner key on spans (``False``: personal data).

        It also stores the extension's state in ``app.extensions["chatkit"]``, registers
        the ``chatkit`` blueprint and adds the ``flask chatkit`` commands. Registering the
        same app twice raises :class:`RuntimeError`.
        """
        if "chatkit" in app.extensions:
            raise RuntimeError("flask-chatkit is already registered on this app.")
        self._check_server_cls()
        settings = read_settings(app)
        _LIFECYCLE.watch(settings.cancel_timeout)
        if settings.loop == "thread":
            _LOOP_THREAD.prefer_native_thread()
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
