"""What the current ChatKit request is, readable before the view runs.

Rate limiters (Flask-Limiter's ``exempt_when``/``cost``) and other
``before_request`` code run before the endpoint reads the body. Reading it
here caches the bytes (or the 413) on ``g`` so the endpoint sees exactly the
same body afterwards and nothing is read twice.
"""

from __future__ import annotations

import json

from flask import current_app, g, request

from .errors import ChatKitHTTPException
from .json_limits import check_json_shape

__all__ = ["MESSAGE_REQUEST_TYPES", "chatkit_request_type", "is_message_request", "request_body"]

ENDPOINT = "chatkit.endpoint"
# The requests that send a user message to ``respond``.
MESSAGE_REQUEST_TYPES = frozenset({"threads.create", "threads.add_user_message"})


def _read_limited(limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` without buffering it all."""
    length = request.content_length
    if length is not None and length > limit:
        raise ChatKitHTTPException(413, f"Request body exceeds {limit} bytes.")
    body = request.stream.read(limit + 1)
    if len(body) > limit:
        raise ChatKitHTTPException(413, f"Request body exceeds {limit} bytes.")
    return body


def request_body(limit: int) -> bytes:
    """The body of the current request, read once (bounded by ``limit``) and cached."""
    cached = g.get("_chatkit_body")
    if cached is None:
        try:
            cached = _read_limited(limit)
        except ChatKitHTTPException as exc:
            cached = exc
        g._chatkit_body = cached
    if isinstance(cached, ChatKitHTTPException):
        raise cached
    assert isinstance(cached, bytes)
    return cached


def chatkit_request_type() -> str | None:
    """The ``type`` of the ChatKit request being served (e.g. ``"threads.create"``).

    None outside a ``POST`` to the ChatKit endpoint, or when the body is not a
    readable ChatKit request (the endpoint then answers 400/413 as usual). Safe to
    call from ``before_request`` hooks such as Flask-Limiter's ``exempt_when``.
    """
    if request.endpoint != ENDPOINT or request.method != "POST":
        return None
    if request.mimetype != "application/json":
        return None
    limit = current_app.extensions["chatkit"].settings.max_request_bytes
    try:
        body = request_body(limit)
        check_json_shape(body)  # never build a pathological body here either (413 later)
        payload = json.loads(body)
    except (ChatKitHTTPException, ValueError, RecursionError):
        return None
    kind = payload.get("type") if isinstance(payload, dict) else None
    return kind if isinstance(kind, str) else None


def is_message_request() -> bool:
    """True when the current request sends a user message (``threads.create`` or
    ``threads.add_user_message``): what a per-user message limit should count."""
    return chatkit_request_type() in MESSAGE_REQUEST_TYPES
