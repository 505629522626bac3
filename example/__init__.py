"""The flask-chatkit demo app: ``create_app()`` (served by ``wsgi.py``).

Configuration, lowest precedence first:
1. the defaults below;
2. environment variables: ``SECRET_KEY``, ``CHATKIT_DATABASE_URL``, ``CHATKIT_DOMAIN_KEY``,
   ``DEMO_WORD_DELAY``, ``DEMO_OFFLINE``, and any ``FLASK_<KEY>`` (Flask's
   ``from_prefixed_env``: ``FLASK_CHATKIT_LOGIN_REQUIRED=false`` sets that key, values
   are parsed as JSON when they can be);
3. the ``config`` dict passed to ``create_app``.
``OTEL_TRACES_EXPORTER=console`` (and ``OTEL_METRICS_EXPORTER=console``) print
OpenTelemetry spans (metrics) to stdout: see ``example/telemetry.py``.
``FLASK_INSTANCE_PATH`` (or ``instance_path=``) moves the instance folder, where the
secret key, the demo users and the default ChatKit SQLite database live.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

from flask import Flask, render_template
from flask_login import login_required

from flask_chatkit import ChatKit

from .server import DemoServer
from .telemetry import setup_console_telemetry
from .users import init_users

CHATKIT_JS = "https://cdn.platform.openai.com/deployments/chatkit/chatkit.js"
ENV_KEYS = (
    "SECRET_KEY",
    "CHATKIT_DATABASE_URL",
    "CHATKIT_DOMAIN_KEY",
    "DEMO_WORD_DELAY",
    "DEMO_OFFLINE",
)


def create_app(config: dict[str, Any] | None = None, *, instance_path: str | None = None) -> Flask:
    instance_path = instance_path or os.environ.get("FLASK_INSTANCE_PATH") or None
    app = Flask(__name__, instance_path=instance_path, instance_relative_config=True)
    Path(app.instance_path).mkdir(parents=True, exist_ok=True)

    app.config.update(
        CHATKIT_CONSOLE=True,
        CHATKIT_DOMAIN_KEY="local-dev",
        DEMO_CHATKIT_JS_URL=CHATKIT_JS,
        DEMO_CHATKIT_JS_TIMEOUT_MS=8000,
        DEMO_WORD_DELAY=0.03,
        DEMO_OFFLINE=False,
        SESSION_COOKIE_SAMESITE="Lax",
        REMEMBER_COOKIE_SAMESITE="Lax",
    )
    for key in ENV_KEYS:
        if os.environ.get(key):
            app.config[key] = os.environ[key]
    app.config.from_prefixed_env()
    app.config.update(config or {})
    app.config["DEMO_WORD_DELAY"] = float(app.config["DEMO_WORD_DELAY"])
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _instance_secret(Path(app.instance_path))

    init_users(app)
    setup_console_telemetry(app)  # OTEL_TRACES_EXPORTER=console; before ChatKit sees it
    ChatKit(app, DemoServer)  # attachments stay enabled (the default)

    def chatkit_urls() -> dict[str, str]:
        prefix = app.config.get("CHATKIT_URL_PREFIX", "/chatkit").rstrip("/")
        return {"api_url": prefix, "console_url": prefix + "/console"}

    app.context_processor(chatkit_urls)

    @app.get("/")
    @login_required
    def index() -> str:
        urls = chatkit_urls()
        return render_template(
            "index.html",
            chatkit_config={
                "apiUrl": urls["api_url"],
                "domainKey": app.config["CHATKIT_DOMAIN_KEY"],
                "scriptUrl": app.config["DEMO_CHATKIT_JS_URL"],
                "loadTimeoutMs": int(app.config["DEMO_CHATKIT_JS_TIMEOUT_MS"]),
            },
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _instance_secret(instance: Path) -> str:
    """A dev secret generated once and kept in the instance folder (mode 0600).

    Created with O_EXCL, so gunicorn workers starting together agree on one key.
    """
    path = instance / "secret_key"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for _ in range(50):
            key = path.read_text().strip()
            if key:
                return key
            time.sleep(0.02)  # the creating worker is still writing
        raise RuntimeError(f"{path} is empty; delete it or set SECRET_KEY") from None
    key = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key
