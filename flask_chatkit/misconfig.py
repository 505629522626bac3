"""Set-up mistakes found at the first ChatKit request: one log line naming the fix, JSON 500.

Each of these can still be fixed after ``init_app`` (``LoginManager(app)`` or
``@login_manager.user_loader`` written below ``ChatKit(app, …)``, ``app.secret_key``
set later, tables created by ``flask db upgrade``, which itself builds the app),
so they are checked when the first request needs them, not at ``init_app``.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from .config import Settings
from .errors import ChatKitHTTPException
from .storage.version import SCHEMA_VERSION, SchemaOutdated

logger = logging.getLogger("flask_chatkit")

NO_USER_LOADER = (
    "Flask-Login's LoginManager has no user_loader, so no request can load its user "
    "(Flask-Login raises 'Missing user_loader or request_loader').",
    "register one: decorate `def load_user(user_id): return User.get(user_id)` with "
    "@login_manager.user_loader (see the README Quickstart).",
)
NO_LOGIN_MANAGER = (
    "CHATKIT_LOGIN_REQUIRED is True but Flask-Login is not set up on this app, "
    "so every ChatKit request would be refused as not signed in.",
    "call LoginManager(app) and give it a user_loader and a sign-in view; or set "
    "app.config['CHATKIT_LOGIN_REQUIRED'] = False for anonymous users; or authenticate "
    "yourself with @chatkit.context_loader.",
)
NO_SECRET_KEY_ANONYMOUS = (
    "CHATKIT_LOGIN_REQUIRED is False, so each anonymous browser's id is kept in the "
    "Flask session, and the session needs a secret key; none is set.",
    "set app.secret_key (config SECRET_KEY) to a long random value kept out of the code, "
    "e.g. app.secret_key = os.environ['SECRET_KEY'].",
)
NO_SECRET_KEY_LOGIN = (
    "Flask-Login keeps the signed-in user in the Flask session, and the session needs "
    "a secret key; none is set.",
    "set app.secret_key (config SECRET_KEY) to a long random value kept out of the code, "
    "e.g. app.secret_key = os.environ['SECRET_KEY'].",
)


class Misconfigured(ChatKitHTTPException):
    """The app's own set-up is wrong: a JSON 500 with code ``misconfigured``."""

    def __init__(self, problem: str, fix: str, public: str | None = None) -> None:
        # ``public``: what the client may read when ``problem`` names internals (a DB URL).
        super().__init__(
            500,
            f"The ChatKit server is misconfigured: {public or problem} "
            "The server log names the fix.",
            "misconfigured",
        )
        self.problem = problem
        self.fix = fix

    def log_line(self) -> str:
        return f"flask-chatkit is misconfigured: {self.problem} Fix: {self.fix}"


def login_problem(app: Flask, settings: Settings, default_context: bool) -> Misconfigured | None:
    """What is wrong with the sign-in set-up the default context relies on, if anything."""
    login_manager: Any = getattr(app, "login_manager", None)
    if login_manager is not None and (
        getattr(login_manager, "_user_callback", None) is None
        and getattr(login_manager, "_request_callback", None) is None
    ):
        # Breaks current_user everywhere, custom context loaders included.
        return Misconfigured(*NO_USER_LOADER)
    if not default_context:
        return None  # a custom context loader owns authentication
    if settings.login_required and login_manager is None:
        return Misconfigured(*NO_LOGIN_MANAGER)
    if not app.secret_key:
        if not settings.login_required:
            return Misconfigured(*NO_SECRET_KEY_ANONYMOUS)
        return Misconfigured(*NO_SECRET_KEY_LOGIN)
    return None


def missing_tables_problem(store: Any) -> Misconfigured | None:
    """``CHATKIT_CREATE_TABLES`` is False and none of the store's tables are there.

    Some but not all missing is an outdated schema: the store's own check says so.
    """
    missing_tables = getattr(store, "missing_tables", None)
    if not callable(missing_tables):
        return None  # not an SQL store: nothing to create
    missing = missing_tables()
    if len(missing) < len(store.metadata.tables):
        return None
    where = store.engine.url.render_as_string(hide_password=True)
    return Misconfigured(
        f"CHATKIT_CREATE_TABLES is False and the database {where} has no ChatKit tables "
        f"(missing: {', '.join(missing)}).",
        "run `flask chatkit init-db` once (or `flask db upgrade` when Flask-Migrate/Alembic "
        "owns the schema, with store.metadata in its target_metadata), or set "
        "CHATKIT_CREATE_TABLES = True to create them on first use.",
        "its database has no ChatKit tables.",
    )


def schema_problem(exc: SchemaOutdated) -> Misconfigured:
    """The database's schema is older than the code (``SQLAlchemyStore.check_schema``)."""
    return Misconfigured(
        f"The ChatKit schema in {exc.where} is older than this flask-chatkit "
        f"(schema version {SCHEMA_VERSION}): {'; '.join(exc.problems)}.",
        exc.fix,
        "its database schema is older than the code.",
    )


class LogOnce:
    """Logs each distinct misconfiguration once per process, however many requests hit it."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, problem: Misconfigured) -> Misconfigured:
        line = problem.log_line()
        if line not in self._seen:
            self._seen.add(line)
            logger.error(line)
        return problem
