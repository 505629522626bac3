"""Per-app state kept in ``app.extensions["chatkit"]``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatkit.server import ChatKitServer
from chatkit.store import AttachmentStore, Store
from flask import Flask, current_app

from .bridge.loop import LoopThread
from .bridge.native import native_lock
from .config import Settings
from .context import ContextLoader, default_context_loader

if TYPE_CHECKING:
    from .extension import ChatKit
    from .telemetry import Telemetry


@dataclass
class ChatKitState:
    extension: ChatKit
    server: ChatKitServer[Any]
    store: Store[Any]
    attachment_store: AttachmentStore[Any] | None
    settings: Settings
    loop_thread: LoopThread
    telemetry: Telemetry | None = None  # set when OpenTelemetry is configured
    _schema_ready: bool = False
    _schema_lock: Any = field(default_factory=native_lock)

    @property
    def context_loader(self) -> ContextLoader:
        # Read at request time: @chatkit.context_loader may run after init_app.
        return self.extension.custom_context_loader or default_context_loader

    @property
    def uses_default_context(self) -> bool:
        return self.extension.custom_context_loader is None

    def ensure_schema(self) -> None:
        """Create the store's tables on first use (CHATKIT_CREATE_TABLES)."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                create_all = getattr(self.store, "create_all", None)
                if self.settings.create_tables and callable(create_all):
                    create_all()
                self._schema_ready = True


def get_state(app: Flask | None = None) -> ChatKitState:
    app = app or current_app
    try:
        state = app.extensions["chatkit"]
    except KeyError:
        raise RuntimeError(
            "flask-chatkit is not initialised on this app: call ChatKit(app, MyServer) "
            "or chatkit.init_app(app) first."
        ) from None
    assert isinstance(state, ChatKitState)
    return state
