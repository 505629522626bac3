"""URLs of this app's attachment routes: stored relative, made absolute when served.

Attachments (and the messages that carry them) are stored with
``chatkit-app:///attachments/<id>/…`` URLs, relative to the blueprint. Each
response turns them into absolute URLs on a trusted base — ``CHATKIT_PUBLIC_URL``,
else ``SERVER_NAME``, else the request's own host — so a forged ``Host`` header
never reaches the database and a new domain needs no data migration.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from flask import Config, Request, current_app, has_request_context, request

from ..config import Settings

__all__ = ["APP_URL", "content_url", "public_base", "upload_url", "url_rewriter"]

APP_URL = "chatkit-app:///"
_APP_URL_JSON = b'"' + APP_URL.encode()


def content_url(attachment_id: str) -> str:
    return f"{APP_URL}attachments/{attachment_id}/content"


def upload_url(attachment_id: str) -> str:
    return f"{APP_URL}attachments/{attachment_id}/upload"


def public_base(settings: Settings) -> str:
    """The absolute URL of the blueprint, from a trusted base when one is configured."""
    current = request._get_current_object() if has_request_context() else None  # type: ignore[attr-defined]
    return _base(settings, current_app.config, current)


def _base(settings: Settings, config: Config, current: Request | None) -> str:
    if settings.public_url:
        base = settings.public_url
    elif config.get("SERVER_NAME"):
        root = str(config.get("APPLICATION_ROOT") or "/").rstrip("/")
        base = f"{config.get('PREFERRED_URL_SCHEME') or 'http'}://{config['SERVER_NAME']}{root}"
    elif current is not None:
        base = current.url_root.rstrip("/")
    else:
        base = ""
    return base + settings.url_prefix


def url_rewriter(settings: Settings) -> Callable[[bytes], bytes]:
    """A function making stored ``chatkit-app:///`` URLs in a JSON body absolute.

    Call it inside the request; the base is worked out only for a body that
    holds such a URL (most hold none: ``request.url_root`` is not free).
    """
    config = current_app.config
    current = request._get_current_object() if has_request_context() else None  # type: ignore[attr-defined]
    replacement: bytes | None = None

    def rewrite(body: bytes) -> bytes:
        nonlocal replacement
        if _APP_URL_JSON not in body:
            return body
        if replacement is None:
            base = _base(settings, config, current)
            replacement = b'"' + json.dumps(base + "/")[1:-1].encode()
        return body.replace(_APP_URL_JSON, replacement)

    return rewrite
