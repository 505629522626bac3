"""The Origin rule (CSRF protection for cookie-authenticated JSON) and CORS.

A request carrying an ``Origin`` header must come from the app's own origin
(``request.host_url`` as Werkzeug sees it) or exactly one of
``CHATKIT_ALLOWED_ORIGINS``; anything else is 403 before any work is done.
Requests without ``Origin`` (curl, server-to-server) pass.
"""

from __future__ import annotations

from flask import Response, request

from ..config import Settings
from ..errors import ChatKitHTTPException

PREFLIGHT_MAX_AGE = "600"
ALLOWED_METHODS = "GET, POST, PUT, OPTIONS"


def _own_origin() -> str:
    return request.host_url.rstrip("/")


def cross_origin_allowed(settings: Settings) -> str | None:
    """The request's Origin when it is one of CHATKIT_ALLOWED_ORIGINS."""
    origin = request.headers.get("Origin")
    if origin and origin.rstrip("/") in settings.allowed_origins:
        return origin
    return None


def check_origin(settings: Settings) -> None:
    origin = request.headers.get("Origin")
    if origin is None:
        return
    if origin.rstrip("/") == _own_origin() or cross_origin_allowed(settings):
        return
    raise ChatKitHTTPException(403, f"Origin {origin!r} is not allowed.")


def preflight_response(settings: Settings) -> Response:
    """Answer CORS preflight; CORS headers themselves are added by :func:`apply_cors`."""
    response = Response(status=204)
    response.headers["Allow"] = ALLOWED_METHODS
    if cross_origin_allowed(settings):
        response.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
        requested = request.headers.get("Access-Control-Request-Headers")
        response.headers["Access-Control-Allow-Headers"] = requested or "Content-Type"
        response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    return response


def apply_cors(response: Response, settings: Settings) -> None:
    origin = cross_origin_allowed(settings)
    if "Vary" in response.headers:
        response.vary.add("Origin")
    else:  # the usual case, without parsing a header set
        response.headers["Vary"] = "Origin"
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = "X-Request-ID"
