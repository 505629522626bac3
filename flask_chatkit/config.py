"""``CHATKIT_*`` config keys: defaults, validation, and the frozen settings read once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from flask import Flask

DEFAULT_MIME_TYPES = [
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
]

DEFAULTS: dict[str, Any] = {
    "CHATKIT_URL_PREFIX": "/chatkit",
    "CHATKIT_DATABASE_URL": None,  # None: SQLite file in app.instance_path
    "CHATKIT_LOGIN_REQUIRED": True,
    "CHATKIT_MAX_REQUEST_BYTES": 4 * 1024 * 1024,
    "CHATKIT_ATTACHMENTS_DIR": None,  # None: app.instance_path/chatkit-attachments
    "CHATKIT_MAX_ATTACHMENT_BYTES": 20 * 1024 * 1024,
    "CHATKIT_ALLOWED_MIME_TYPES": DEFAULT_MIME_TYPES,
    "CHATKIT_ALLOWED_ORIGINS": [],
    "CHATKIT_HEARTBEAT_SECONDS": 15.0,
    "CHATKIT_ON_DISCONNECT": "cancel",
    "CHATKIT_CANCEL_TIMEOUT": 10.0,
    "CHATKIT_MAX_PAGE_SIZE": 100,
    "CHATKIT_CREATE_TABLES": True,
    "CHATKIT_CONSOLE": False,  # the protocol console at <prefix>/console (also on in debug)
    "CHATKIT_ATTACHMENTS_URL": None,  # None: disk; "s3://bucket/prefix": S3-compatible storage
    "CHATKIT_MAX_METADATA_BYTES": 16 * 1024,  # a request's serialized metadata beyond it: 413
    "CHATKIT_PUBLIC_URL": None,  # trusted base for absolute URLs; else SERVER_NAME, else host
    "CHATKIT_HEALTH": True,  # GET <prefix>/health for load balancers
    "CHATKIT_OTEL_RECORD_OWNER": False,  # the owner key as a span attribute (personal data)
    # One user's uploaded-but-unsent attachment bytes beyond it: 413.
    "CHATKIT_MAX_PENDING_ATTACHMENT_BYTES": 256 * 1024 * 1024,
    "CHATKIT_BODY_TIMEOUT": 30.0,  # seconds to receive a JSON request body; then 408
    "CHATKIT_MAX_STREAMS_PER_USER": 20,  # open streams per user (owner key) and worker; then 429
    "CHATKIT_CHECKPOINT_SECONDS": 2.0,  # a streaming reply's text is saved this often; 0: off
    "CHATKIT_LOOP": "hub",  # under gevent: the loop as a greenlet on the hub, or "thread"
}


@dataclass(frozen=True)
class Settings:
    url_prefix: str
    database_url: str
    login_required: bool
    max_request_bytes: int
    attachments_dir: str
    max_attachment_bytes: int
    allowed_mime_types: tuple[str, ...]
    allowed_origins: frozenset[str]
    heartbeat_seconds: float
    on_disconnect: Literal["cancel", "finish"]
    cancel_timeout: float
    max_page_size: int
    create_tables: bool
    console: bool
    attachments_url: str | None
    max_metadata_bytes: int
    max_pending_attachment_bytes: int
    public_url: str | None
    health: bool
    otel_record_owner: bool = False
    body_timeout: float = 30.0
    max_streams_per_user: int = 20
    checkpoint_seconds: float = 2.0  # 0.0: replies are saved only when they end
    loop: Literal["hub", "thread"] = "hub"


def _positive(name: str, value: Any, kind: type = int) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return number


def _not_negative(name: str, value: Any) -> float:
    try:
        number = float(value or 0)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be 0 (off) or positive, got {value!r}")
    return number


def read_settings(app: Flask) -> Settings:
    """Apply defaults with ``setdefault`` and validate; raises ValueError on bad config."""
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, list(value) if isinstance(value, list) else value)
    c = app.config
    prefix = "/" + str(c["CHATKIT_URL_PREFIX"]).strip("/")
    on_disconnect = c["CHATKIT_ON_DISCONNECT"]
    if on_disconnect not in ("cancel", "finish"):
        raise ValueError(
            f"CHATKIT_ON_DISCONNECT must be 'cancel' or 'finish', got {on_disconnect!r}"
        )
    loop = c["CHATKIT_LOOP"]
    if loop not in ("hub", "thread"):
        raise ValueError(f"CHATKIT_LOOP must be 'hub' or 'thread', got {loop!r}")
    origins = c["CHATKIT_ALLOWED_ORIGINS"]
    if isinstance(origins, str):
        origins = [o for o in origins.replace(",", " ").split() if o]
    mime_types = c["CHATKIT_ALLOWED_MIME_TYPES"]
    if isinstance(mime_types, str):
        mime_types = [m for m in mime_types.replace(",", " ").split() if m]
    database_url = c["CHATKIT_DATABASE_URL"] or "sqlite:///" + os.path.join(
        app.instance_path, "chatkit.sqlite3"
    )
    attachments_dir = c["CHATKIT_ATTACHMENTS_DIR"] or os.path.join(
        app.instance_path, "chatkit-attachments"
    )
    heartbeat = float(c["CHATKIT_HEARTBEAT_SECONDS"] or 0)  # 0 / None: no heartbeats
    return Settings(
        url_prefix=prefix if prefix != "/" else "",
        database_url=str(database_url),
        login_required=bool(c["CHATKIT_LOGIN_REQUIRED"]),
        max_request_bytes=_positive("CHATKIT_MAX_REQUEST_BYTES", c["CHATKIT_MAX_REQUEST_BYTES"]),
        attachments_dir=str(attachments_dir),
        max_attachment_bytes=_positive(
            "CHATKIT_MAX_ATTACHMENT_BYTES", c["CHATKIT_MAX_ATTACHMENT_BYTES"]
        ),
        allowed_mime_types=tuple(str(m).lower() for m in mime_types),
        allowed_origins=frozenset(str(o).rstrip("/") for o in origins),
        heartbeat_seconds=heartbeat if heartbeat > 0 else 0.0,
        on_disconnect=on_disconnect,
        cancel_timeout=_positive("CHATKIT_CANCEL_TIMEOUT", c["CHATKIT_CANCEL_TIMEOUT"], float),
        max_page_size=_positive("CHATKIT_MAX_PAGE_SIZE", c["CHATKIT_MAX_PAGE_SIZE"]),
        create_tables=bool(c["CHATKIT_CREATE_TABLES"]),
        console=bool(c["CHATKIT_CONSOLE"]) or app.debug,
        attachments_url=str(c["CHATKIT_ATTACHMENTS_URL"]) if c["CHATKIT_ATTACHMENTS_URL"] else None,
        max_metadata_bytes=_positive("CHATKIT_MAX_METADATA_BYTES", c["CHATKIT_MAX_METADATA_BYTES"]),
        max_pending_attachment_bytes=_positive(
            "CHATKIT_MAX_PENDING_ATTACHMENT_BYTES", c["CHATKIT_MAX_PENDING_ATTACHMENT_BYTES"]
        ),
        public_url=str(c["CHATKIT_PUBLIC_URL"]).rstrip("/") if c["CHATKIT_PUBLIC_URL"] else None,
        health=bool(c["CHATKIT_HEALTH"]),
        otel_record_owner=bool(c["CHATKIT_OTEL_RECORD_OWNER"]),
        body_timeout=_positive("CHATKIT_BODY_TIMEOUT", c["CHATKIT_BODY_TIMEOUT"], float),
        max_streams_per_user=_positive(
            "CHATKIT_MAX_STREAMS_PER_USER", c["CHATKIT_MAX_STREAMS_PER_USER"]
        ),
        checkpoint_seconds=_not_negative(
            "CHATKIT_CHECKPOINT_SECONDS", c["CHATKIT_CHECKPOINT_SECONDS"]
        ),
        loop=loop,
    )
