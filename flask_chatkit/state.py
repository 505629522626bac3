"""Per-app state kept in ``app.extensions["chatkit"]``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from chatkit.server import ChatKitServer
from chatkit.store import AttachmentStore, Store
from flask import Flask, current_app

from .bridge.loop import LoopThread
from .config import Settings
from .context import ContextLoader, default_context_loader
from .misconfig import LogOnce, login_problem, missing_tables_problem, schema_problem
from .storage.version import SchemaOutdated

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
    _setup_ok: bool = False
    _log_once: LogOnce = field(default_factory=LogOnce)

    @property
    def context_loader(self) -> ContextLoader:
        # Read at request time: @chatkit.context_loader may run after init_app.
        return self.extension.custom_context_loader or default_context_loader

    @property
    def uses_default_context(self) -> bool:
        return self.extension.custom_context_loader is None

    def check_setup(self) -> None:
        """Raise ``Misconfigured`` (JSON 500, logged once) when sign-in cannot work."""
        if self._setup_ok:
            return
        problem = login_problem(current_app, self.settings, self.uses_default_context)
        if problem is not None:
            raise self._log_once(problem)
        self._setup_ok = True

    def ensure_schema(self) -> None:
        """Create the store's tables on first use (CHATKIT_CREATE_TABLES).

        With creation off, no tables at all, or a schema older than the code, is a JSON 500
        ``misconfigured`` (logged once, naming the fix), re-checked at each request until
        it is fixed.
        """
        if self._schema_ready:
            return
        # Made at first use, inside a request: under gevent threading.Lock is then
        # gevent's, so a greenlet waiting for it lets the one creating the tables run on
        # (psycopg waits cooperatively). A native lock would block the hub instead, and
        # with it the holder: two first requests at once hung the worker.
        lock = self.__dict__.setdefault("_schema_lock", threading.Lock())
        with lock:
            if not self._schema_ready:
                create_all = getattr(self.store, "create_all", None)
                try:
                    if self.settings.create_tables and callable(create_all):
                        create_all()
                    elif (problem := missing_tables_problem(self.store)) is not None:
                        raise self._log_once(problem)
                    check_schema_version(self.store)
                except SchemaOutdated as exc:
                    raise self._log_once(schema_problem(exc)) from None
                self._schema_ready = True


def check_schema_version(store: Any) -> None:
    """The store's own schema check, when it has one (``SQLAlchemyStore.check_schema``)."""
    check = getattr(store, "check_schema", None)
    if callable(check):
        check()


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
