"""A streaming response body that keeps the request's Flask contexts alive until it closes.

``respond`` keeps running on the loop after the view has returned, and it may use
the request's app context (Flask-SQLAlchemy's ``db.session`` is scoped to it) through
``sync_to_async``. Flask tears a context down at its last pop; since Flask 3.1
``stream_with_context`` pushes its contexts only when the body is first iterated,
so the view's own pop was the last one and ``db.session`` was closed under a running
``respond`` (measured under gthread: ``IllegalStateChangeError`` and a 500).

So the body takes one more reference to both contexts while the view still runs and
gives them back when it is read to the end or closed — the WSGI server calls
``close()`` after the last write or when the client leaves, even if iteration never
started. Teardown then runs exactly
once, after the stream has ended, in the thread or greenlet that served the request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from flask.globals import _cv_app, _cv_request

from ..bridge.stream import Stream


class ContextKeepingBody:
    """The WSGI iterable of a ChatKit stream; create it inside the view.

    ``rewrite`` is applied to each write (stored relative attachment URLs made absolute).
    """

    def __init__(self, stream: Stream, rewrite: Callable[[bytes], bytes]) -> None:
        self._stream = stream
        self._rewrite = rewrite
        self._app_ctx = _cv_app.get()
        self._request_ctx = _cv_request.get()
        # One more push of each: the view's own pops are then not the last ones.
        self._app_ctx.push()
        self._request_ctx.push()
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for write in self._stream:
                yield self._rewrite(write)
        finally:  # read to the end (a test client may never call close())
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
                self._app_ctx.pop()
