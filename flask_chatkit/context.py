"""The per-request ChatKit context and the default way to build it.

The default loader reads Flask-Login's ``current_user``; it must run *inside*
the request (that is where Flask-Login keeps the user), so the view calls it
before handing work to the asyncio bridge.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Request, current_app, g, session

from .errors import ChatKitHTTPException

ContextLoader = Callable[[Request, dict[str, Any]], Any]

ANONYMOUS_SESSION_KEY = "_chatkit_anonymous_id"


def new_request_id() -> str:
    """32 random hex digits (as ``uuid4().hex``, without building a UUID)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class RequestContext:
    """What ``respond()`` receives as ``context`` unless a custom loader is set."""

    user_id: str
    user: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    locale: str | None = None
    request_id: str = field(default_factory=new_request_id)


def _authenticated_user() -> Any:
    """Flask-Login's user when one is logged in, else None (also without Flask-Login)."""
    if getattr(current_app, "login_manager", None) is None:
        return None
    from flask_login import current_user

    user = current_user._get_current_object()  # unwrap: the context outlives the proxy's request
    return user if getattr(user, "is_authenticated", False) else None


def require_login() -> Any:
    """The logged-in user, or 401 while ``CHATKIT_LOGIN_REQUIRED`` (None when anonymous is ok)."""
    user = _authenticated_user()
    if user is None and current_app.extensions["chatkit"].settings.login_required:
        raise ChatKitHTTPException(401, "Authentication required.")
    return user


def default_context_loader(request: Request, metadata: dict[str, Any]) -> RequestContext:
    """Build a :class:`RequestContext` from Flask-Login's ``current_user``.

    Anonymous requests get 401 while ``CHATKIT_LOGIN_REQUIRED`` is True; otherwise
    each anonymous browser gets a stable id kept in the Flask session.
    """
    user = require_login()
    if user is not None:
        user_id = str(user.get_id())
    else:
        if not current_app.secret_key:
            raise RuntimeError(
                "CHATKIT_LOGIN_REQUIRED=False keeps anonymous ids in the Flask session: "
                "set app.secret_key (SECRET_KEY)."
            )
        user_id = str(session.get(ANONYMOUS_SESSION_KEY) or "")
        if not user_id:
            user_id = f"anon_{uuid.uuid4().hex}"
            session[ANONYMOUS_SESSION_KEY] = user_id
    return RequestContext(
        user_id=user_id,
        user=user,
        metadata=dict(metadata),
        locale=request.accept_languages.best,
        request_id=g.get("chatkit_request_id") or new_request_id(),
    )
