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

#: Sent for every ChatKit request, before ChatKit runs (also before its ownership checks
#: answer a 404). Keyword arguments: ``op`` (the request type, e.g. ``"threads.create"``)
#: and ``context`` (what the context loader returned).
request_received = _signals.signal("chatkit-request-received")

#: Sent when a streaming reply's first byte is about to be sent. Keyword arguments:
#: ``op``, ``thread_id`` (for ``threads.create``, the new thread's) and ``context``.
stream_started = _signals.signal("chatkit-stream-started")

#: Sent when a streaming reply ended normally. Keyword arguments: ``op``, ``thread_id``,
#: ``context``, ``events`` (the ChatKit events sent to the client) and ``duration``
#: (seconds from the request to the end of the stream). With
#: ``CHATKIT_ON_DISCONNECT = "finish"``, a reply whose client left is reported when it
#: really ends, from a background thread with the app context pushed (no ``request``).
stream_finished = _signals.signal("chatkit-stream-finished")

#: Sent when the client left (or the worker stopped) and the reply was cancelled; ChatKit
#: has saved the partial reply. Keyword arguments: as :data:`stream_finished`.
stream_cancelled = _signals.signal("chatkit-stream-cancelled")

#: Sent when an error happened after the stream began (the client got an ``error``
#: event). Keyword arguments: as :data:`stream_finished`, plus ``exc``: the exception
#: raised in ``respond``, or, when ChatKit turned a ``StreamError`` into the error event
#: itself, an object with that event's ``code`` and ``message``.
stream_failed = _signals.signal("chatkit-stream-failed")

#: Sent when an upload route stored an attachment's bytes. Keyword arguments:
#: ``attachment_id``, ``size`` (bytes) and ``context``.
attachment_stored = _signals.signal("chatkit-attachment-stored")

__all__ = [
    "attachment_stored",
    "request_received",
    "stream_cancelled",
    "stream_failed",
    "stream_finished",
    "stream_started",
]
