"""The set-up many test modules share: log in, a SQLite app, SSE parsing, thread ids.

Fixtures built on these live in tests/conftest.py (``login_as``, ``sqlite_app``,
``loop_thread``; the store fixtures ``sql_store`` / ``store_url`` in tests/pg.py).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from flask_chatkit.testing import ChatKitClient

from .apps import create_test_app


def login_as(app_or_client: Flask | FlaskClient, user: str) -> ChatKitClient:
    """A test client logged in as ``user`` (through the test app's ``/login/<user>``),
    wrapped in the extension's ``ChatKitClient``. A Flask app gets a new client."""
    client = app_or_client.test_client() if isinstance(app_or_client, Flask) else app_or_client
    assert client.post(f"/login/{user}").status_code == 200
    return ChatKitClient(client)


def sqlite_url(tmp_path: Path, name: str = "db.sqlite3") -> str:
    return f"sqlite:///{tmp_path / name}"


def sqlite_app(tmp_path: Path, server_cls: Any = None, **config: Any) -> Flask:
    """The test app (tests/apps.py) on the extension's default ``SQLAlchemyStore``, with
    a SQLite file and an instance folder in ``tmp_path``; ``config`` overrides."""
    config.setdefault("CHATKIT_DATABASE_URL", sqlite_url(tmp_path))
    config.setdefault("instance_path", str(tmp_path / "instance"))
    if server_cls is not None:
        config["server_cls"] = server_cls
    return create_test_app(store=None, **config)


def sse_data(body: bytes | str) -> list[dict[str, Any]]:
    """The JSON ``data:`` events of an SSE body, in order. Heartbeat comments are
    skipped, and so is a last block torn by a dropped connection."""
    raw = body.encode() if isinstance(body, str) else body
    events = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                with contextlib.suppress(ValueError):  # a block cut short
                    events.append(json.loads(line[5:].strip()))
    return events


def _field(event: Any, name: str) -> Any:
    return event.get(name) if isinstance(event, dict) else getattr(event, name, None)


def thread_id_of(events: list[Any]) -> str | None:
    """The id of the thread a stream created: its ``thread.created`` event (JSON dicts
    or the SDK's event objects alike); None if there is none."""
    for event in events:
        if _field(event, "type") == "thread.created":
            thread = _field(event, "thread")
            return str(_field(thread, "id"))
    return None


def created_thread_id(events: list[Any]) -> str:
    """:func:`thread_id_of` for a stream that must have created a thread."""
    thread_id = thread_id_of(events)
    assert thread_id is not None, f"no thread.created event in {events!r:.300}"
    return thread_id
