"""The error contract: every failure is JSON ``{"error": {"code", "message"}}``.

Views raise :class:`ChatKitHTTPException` (or a plain Werkzeug ``HTTPException``,
e.g. ``abort(401)`` inside a context loader); the blueprint's handlers turn both
into the same JSON shape so clients never see HTML or a traceback.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify
from werkzeug.exceptions import HTTPException

# Stable, machine-readable codes per status; clients switch on these.
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    500: "internal_error",
    501: "not_implemented",
    503: "service_unavailable",
}


DEFAULT_RETRY_AFTER = 60  # seconds, for a 429 that names no window

SCHEMA_ERRORS = ("no such table", "no such column")


class ChatKitHTTPException(HTTPException):
    """An HTTP error with a specific code and a message safe to show a client."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(description=message)
        self.code = status
        self.error_code = code or STATUS_CODES.get(status, "error")
        self.message = message
        self.extra_headers = headers or {}

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [*super().get_headers(*args, **kwargs), *self.extra_headers.items()]


def method_not_allowed(method: str, allowed: str) -> ChatKitHTTPException:
    """405 with the ``Allow`` header listing what the route takes."""
    return ChatKitHTTPException(
        405, f"Method {method} not allowed; use {allowed}.", headers={"Allow": allowed}
    )


def bad_request(message: str, code: str = "bad_request") -> ChatKitHTTPException:
    return ChatKitHTTPException(400, message, code)


def error_response(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
) -> Response:
    body: dict[str, Any] = {
        "error": {"code": code or STATUS_CODES.get(status, "error"), "message": message}
    }
    response = jsonify(body)
    response.status_code = status
    if headers:
        response.headers.update(headers)
    return response


def http_exception_response(exc: HTTPException) -> Response:
    """JSON for any Werkzeug HTTP error, keeping headers such as ``Allow``."""
    status = exc.code or 500
    if isinstance(exc, ChatKitHTTPException):
        code, message = exc.error_code, exc.message
    else:
        code = STATUS_CODES.get(status, "error")
        message = exc.description or exc.name
    headers = {
        k: v for k, v in exc.get_headers() if k.lower() not in ("content-type", "content-length")
    }
    if status == 429 and not any(k.lower() == "retry-after" for k in headers):
        headers["Retry-After"] = str(retry_after_seconds(exc))
    return error_response(status, message, code, headers)


def retry_after_seconds(exc: HTTPException) -> int:
    """A safe ``Retry-After`` for a 429 that has none: the limit's whole window.

    Flask-Limiter's ``RateLimitExceeded.limit.limit`` is a ``limits`` item with
    ``get_expiry()``; with ``RATELIMIT_HEADERS_ENABLED`` Flask-Limiter replaces
    this with the exact reset time after the handler runs.
    """
    item = getattr(getattr(exc, "limit", None), "limit", None)
    get_expiry = getattr(item, "get_expiry", None)
    if callable(get_expiry):
        try:
            return max(1, int(get_expiry()))
        except (TypeError, ValueError):
            pass
    return DEFAULT_RETRY_AFTER


def classify_exception(exc: BaseException) -> ChatKitHTTPException | None:
    """The HTTP error an exception raised while serving stands for, if any.

    None means a real server fault (500).
    """
    from chatkit.store import NotFoundError
    from sqlalchemy import exc as sa_exc

    from .storage.disk import StorageUnavailable

    if isinstance(exc, ChatKitHTTPException):
        return exc
    if isinstance(exc, StorageUnavailable):  # logged with the fix by the storage
        return ChatKitHTTPException(
            503, "Attachment storage is unavailable; try again shortly.", "storage_unavailable"
        )
    if isinstance(exc, NotFoundError):
        return ChatKitHTTPException(404, str(exc) or "Not found.")
    # The database is down, unreachable or busy: a retryable 503, not a traceback.
    # SQLite also reports a missing schema as OperationalError: that is a real
    # fault (500), not an outage.
    if isinstance(exc, sa_exc.OperationalError) and str(exc.orig).startswith(SCHEMA_ERRORS):
        return None
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError) or (
        isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
    ):
        return ChatKitHTTPException(503, "The database is unavailable; try again shortly.")
    return None
