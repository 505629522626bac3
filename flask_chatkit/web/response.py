"""What the view sends back: absolute attachment URLs, and the body of a stream.

* **URLs.** Attachments are stored with ``chatkit-app:///attachments/<id>/…`` URLs,
  relative to the blueprint. Each response turns them into absolute URLs on a trusted
  base — ``CHATKIT_PUBLIC_URL``, else ``SERVER_NAME``, else the request's own host.
* **The stream's body keeps the request's Flask contexts alive until it closes.**
  ``respond`` keeps running on the loop after the view has returned, and it may use
  the request's app context (Flask-SQLAlchemy's ``db.session`` is scoped to it)
  through ``sync_to_async``. Flask tears a context down at its last pop, and since
  Flask 3.1 ``stream_with_context`` pushes its contexts only when the body is first
  iterated, so the view's own pop would be the last one and ``db.session`` would be
  closed under a running ``respond``. So the body takes one more reference to both
  contexts while the view still runs and gives them back when it is read to the end
  or closed (the WSGI server calls ``close()`` after the last write or when the
  client leaves, even if iteration never started). Teardown then runs exactly once,
  after the stream has ended, in the thread or greenlet that served the request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Config, Request, Response, current_app, has_request_context, request
from flask.globals import _cv_app, _cv_request

from ..attachments import APP_URL
from ..bridge.stream import Stream
from ..config import Settings

_APP_URL_JSON = b'"' + APP_URL.encode()


class ContextKeepingBody:
    """The WSGI iterable of a ChatKit stream; create it inside the view.

    ``rewrite`` is applied to each write (stored relative attachment URLs made absolute).
    Serve it with :class:`StreamResponse`.
    """

    __slots__ = ("_app_ctx", "_closed", "_request_ctx", "_rewrite", "_stream", "on_close")

    def __init__(self, stream: Stream, rewrite: Callable[[bytes], bytes]) -> None:
        self._stream = stream
        self._rewrite = rewrite
        self.on_close: list[Callable[[], object]] = []  # the response's call_on_close
        self._app_ctx = _cv_app.get()
        self._request_ctx = _cv_request.get()
        # One more push of each: the view's own pops are then not the last ones.
        self._app_ctx.push()
        # Without its URL adapter for this push: a push matches the URL again, and
        # the request already holds the match (url_rule, view_args) of the first.
        adapter, self._request_ctx.url_adapter = self._request_ctx.url_adapter, None
        try:
            self._request_ctx.push()
        finally:
            self._request_ctx.url_adapter = adapter
        self._closed = False

    # An iterator that calls the stream's __next__ as a plain method: no level between
    # gunicorn's write loop and the stream's wait but this (see Stream.__next__).
    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return self._rewrite(self._stream.__next__())
        except BaseException:  # read to the end (a test client may never call close())
            self.close()
            raise

    def __del__(self) -> None:
        # Dropped unclosed (a test client's response never read): closed when collected,
        # as a generator body would be, so the request's contexts do not stay pushed.
        if not getattr(self, "_closed", True):
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stream.close()  # ends the stream first: its end signals see the contexts
        finally:
            # Reverse order of the pushes; the last pop of each runs Flask's teardown.
            try:
                self._request_ctx.pop()
            finally:
                try:
                    self._app_ctx.pop()
                finally:
                    for callback in self.on_close:
                        callback()


class StreamResponse(Response):
    """An SSE response whose body goes to the WSGI server as it is.

    ``direct_passthrough``: werkzeug would otherwise wrap the body in its encoding
    generator and a ``ClosingIterator``, two more levels on the stack of every waiting
    stream (see Stream.__next__). The server then closes the body, not the response,
    so ``call_on_close`` callbacks are kept by the body and run by its ``close()``,
    after the stream and its teardown. (The body holds the callbacks, not the
    response: a body that held its response would be kept alive by a reference
    cycle, and one never closed would then be closed at a random later moment.)
    """

    def __init__(self, body: ContextKeepingBody, headers: dict[str, str]) -> None:
        super().__init__(
            body, mimetype="text/event-stream", headers=headers, direct_passthrough=True
        )
        self._body = body

    def call_on_close(self, func: Callable[[], Any]) -> Callable[[], Any]:
        self._body.on_close.append(func)
        return func


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
