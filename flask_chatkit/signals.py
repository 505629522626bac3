"""Flask signals (blinker) for ChatKit requests, streams and uploads.

Every signal is sent with the Flask app as sender, inside the request's app
context (``current_app``, and while the request is still being served,
``request`` and ``g``)::

    from flask_chatkit import signals

    @signals.stream_cancelled.connect_via(app)
    def count_cancel(app, op, thread_id, context, events, duration, **extra):
        ...

Receivers should accept ``**extra`` so new keyword arguments can be added.
A receiver that raises is logged (``flask_chatkit`` logger) and skipped: it
never breaks a request or a stream.

======================  ==========================================================
``request_received``    every ChatKit request, before ChatKit runs:
                        ``op``, ``context``
``stream_started``      a streaming reply's first byte is about to be sent:
                        ``op``, ``thread_id``, ``context``
``stream_finished``     the reply ended normally: ``op``, ``thread_id``,
                        ``context``, ``events``, ``duration`` (seconds)
``stream_cancelled``    the client left (or the worker stopped) and the reply
                        was cancelled: same arguments
``stream_failed``       an error after the stream began: same plus ``exc``
``attachment_stored``   an upload's bytes were stored: ``attachment_id``,
                        ``size``, ``context``
======================  ==========================================================
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

request_received = _signals.signal("chatkit-request-received")
stream_started = _signals.signal("chatkit-stream-started")
stream_finished = _signals.signal("chatkit-stream-finished")
stream_cancelled = _signals.signal("chatkit-stream-cancelled")
stream_failed = _signals.signal("chatkit-stream-failed")
attachment_stored = _signals.signal("chatkit-attachment-stored")

__all__ = [
    "attachment_stored",
    "request_received",
    "stream_cancelled",
    "stream_failed",
    "stream_finished",
    "stream_started",
]

