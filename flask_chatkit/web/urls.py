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

from flask import current_app, has_request_context, request

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
    config = current_app.config
    if settings.public_url:
        base = settings.public_url
    elif config.get("SERVER_NAME"):
        root = str(config.get("APPLICATION_ROOT") or "/").rstrip("/")
        base = f"{config.get('PREFERRED_URL_SCHEME') or 'http'}://{config['SERVER_NAME']}{root}"
    elif has_request_context():
        base = request.url_root.rstrip("/")
    else:
        base = ""
    return base + settings.url_prefix


def url_rewriter(settings: Settings) -> Callable[[bytes], bytes]:
    """A function making stored ``chatkit-app:///`` URLs in a JSON body absolute."""
    replacement = b'"' + json.dumps(public_base(settings) + "/")[1:-1].encode()

    def rewrite(body: bytes) -> bytes:
        return body.replace(_APP_URL_JSON, replacement) if _APP_URL_JSON in body else body

    return rewrite
