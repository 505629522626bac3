"""Demo users: a username-only login kept in a small SQLite table.

Passwords are deliberately out of scope: anyone may sign in as any name. The point is
to give Flask-Login (and so flask-chatkit's per-user threads) a real user object.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

USERNAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")

metadata = MetaData()
users = Table(
    "demo_users",
    metadata,
    Column("username", String(40), primary_key=True),
    Column("created_at", DateTime, nullable=False),
)

bp = Blueprint("auth", __name__)


class User(UserMixin):
    def __init__(self, username: str) -> None:
        self.username = username

    def get_id(self) -> str:
        return self.username


def _engine(app: Flask | None = None) -> Engine:
    engine: Engine = (app or current_app).extensions["demo_users_engine"]
    return engine


def init_users(app: Flask) -> None:
    url = app.config.get("DEMO_USERS_DATABASE_URL") or (
        "sqlite:///" + str(Path(app.instance_path) / "demo_users.sqlite3")
    )
    engine = create_engine(url)
    metadata.create_all(engine)
    app.extensions["demo_users_engine"] = engine

    login_manager = LoginManager(app)
    login_manager.login_view = "auth.login"

    @login_manager.user_loader
    def load_user(user_id: str) -> User | None:
        with _engine().connect() as conn:
            row = conn.execute(select(users.c.username).where(users.c.username == user_id)).first()
        return User(row[0]) if row else None

    app.register_blueprint(bp)
    app.jinja_env.globals["csrf_token"] = csrf_token


def get_or_create(username: str) -> User:
    with _engine().connect() as conn:
        found = conn.execute(select(users.c.username).where(users.c.username == username)).first()
    if not found:
        now = datetime.now(timezone.utc)
        # A concurrent request may have created the same user: that is fine.
        with contextlib.suppress(IntegrityError), _engine().begin() as conn:
            conn.execute(insert(users).values(username=username, created_at=now))
    return User(username)


def csrf_token() -> str:
    token = session.get("_csrf")
    if not token:
        token = session["_csrf"] = secrets.token_urlsafe(24)
    return str(token)


def _check_csrf() -> None:
    sent = request.form.get("csrf_token", "")
    if not sent or not secrets.compare_digest(sent, session.get("_csrf", "")):
        abort(400, "The form expired; reload the page and try again.")


# What a browser ignores or rewrites before resolving a URL: C0 controls, DEL and
# whitespace (tab and newline are dropped anywhere, "/\t/x" becomes "//x"), and a
# backslash, which counts as "/" in http(s) URLs ("/\\x" is "//x").
_IGNORED_IN_URLS = re.compile(r"[\x00-\x20\x7f\s]")


def _safe_next(target: str | None) -> str:
    """A same-origin path for ``?next=``, else the index: never another site.

    The target is normalised the way a browser would read it, parsed with
    :func:`urllib.parse.urlsplit`, and refused if it names a scheme or a host.
    The normalised path (not the raw input) is what the redirect carries.
    """
    cleaned = _IGNORED_IN_URLS.sub("", target or "").replace("\\", "/")
    parts = urlsplit(cleaned)
    # "///x" parses with an empty netloc, yet a browser reads it as host x.
    if parts.scheme or parts.netloc or not cleaned.startswith("/") or cleaned.startswith("//"):
        return url_for("index")
    return urlunsplit(("", "", parts.path, parts.query, parts.fragment))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Any:
    error = None
    username = ""
    if request.method == "POST":
        _check_csrf()
        username = request.form.get("username", "").strip()
        if USERNAME.match(username):
            login_user(get_or_create(username), remember=True)
            return redirect(_safe_next(request.form.get("next")))
        error = "Use 1 to 40 letters, digits, dots, dashes or underscores."
    if current_user.is_authenticated and request.method == "GET":
        return redirect(_safe_next(request.args.get("next")))
    status = 400 if error else 200
    return (
        render_template(
            "login.html", error=error, username=username, next=request.args.get("next", "")
        ),
        status,
    )


@bp.post("/logout")
def logout() -> Any:
    # POST with the form's CSRF token only: a cross-site link or form cannot sign you out.
    _check_csrf()
    logout_user()
    return redirect(url_for("auth.login"))
