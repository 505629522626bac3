"""Signals and OpenTelemetry for one ChatKit request, from receipt to the stream's end.

The view makes a :class:`RequestObserver` once the request is parsed and
its context resolved. The stream's end is reported by the bridge's
``on_end`` callback: in the request's own greenlet/thread while the WSGI
response is iterated or closed (the request context is still pushed), or
on a native thread for a reply finishing after its client left
(``CHATKIT_ON_DISCONNECT = "finish"``), where the app context is pushed
here. Nothing here runs per event.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from blinker import NamedSignal
from flask import Flask, current_app, has_app_context
from werkzeug.exceptions import HTTPException

from .. import signals
from ..bridge.stream import StreamEnd, StreamStats
from ..config import Settings
from ..errors import classify_exception

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from ..state import ChatKitState
    from ..telemetry import Telemetry

logger = logging.getLogger("flask_chatkit")


def send_signal(signal: NamedSignal, sender: Any, **kwargs: Any) -> None:
    """Call each receiver; one that raises is logged and the others still run."""
    if not signal.receivers:  # the common case: nothing connected, nothing to do
        return
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception("receiver %r of signal %r failed", receiver, signal.name)


class ChatKitErrorEvent(Exception):
    """``stream_failed``'s ``exc`` when only ChatKit's error event tells of the failure.

    (ChatKit sends an error event for a ``StreamError``/``CustomStreamError``
    raised in ``respond`` without logging it.)
    """

    def __init__(self, code: str, message: str | None) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class _RespondError:
    __slots__ = ("exc",)

    def __init__(self) -> None:
        self.exc: BaseException | None = None


# Set per request before the view copies its context for the loop, so the
# log filter below, running inside respond's task, finds this request's holder.
_respond_error: contextvars.ContextVar[_RespondError | None] = contextvars.ContextVar(
    "flask_chatkit_respond_error", default=None
)


class _KeepRespondError(logging.Filter):
    """ChatKit logs the exception it turns into an error event: keep it for the signal."""

    def filter(self, record: logging.LogRecord) -> bool:
        holder = _respond_error.get()
        if holder is not None and holder.exc is None and record.exc_info:
            holder.exc = record.exc_info[1]
        return True


_chatkit_logger = logging.getLogger("chatkit")
if not any(isinstance(f, _KeepRespondError) for f in _chatkit_logger.filters):
    _chatkit_logger.addFilter(_KeepRespondError())


def stream_failure(stats: StreamStats, holder: _RespondError) -> BaseException:
    """The exception behind an error event: the logged one, else the event's code."""
    if holder.exc is not None:
        return holder.exc
    code, message = "stream.error", None
    with contextlib.suppress(ValueError, AttributeError):
        event = json.loads((stats.error_event or b"data: {}")[6:])
        code, message = str(event.get("code") or code), event.get("message")
    return ChatKitErrorEvent(code, message)


def load_telemetry(settings: Settings) -> Telemetry | None:
    """Telemetry when the app configured an OpenTelemetry provider, else None.

    Looks only at modules already imported (the app configures OpenTelemetry
    before ``init_app``); ``flask_chatkit.telemetry`` is imported only then.
    """
    trace_api = sys.modules.get("opentelemetry.trace")
    metrics_api = sys.modules.get("opentelemetry.metrics")
    configured = False
    if trace_api is not None:
        provider = trace_api.get_tracer_provider()
        configured = not isinstance(
            provider, (trace_api.ProxyTracerProvider, trace_api.NoOpTracerProvider)
        )
    if not configured and metrics_api is not None:
        provider = metrics_api.get_meter_provider()
        # The API's default is a private proxy class: compare by name.
        configured = not isinstance(provider, metrics_api.NoOpMeterProvider) and (
            type(provider).__name__ != "_ProxyMeterProvider"
        )
    if not configured:
        return None
    from ..telemetry import Telemetry

    return Telemetry(record_owner=settings.otel_record_owner)


def status_of(exc: BaseException) -> int:
    """The HTTP status the blueprint's error handlers answer ``exc`` with."""
    if isinstance(exc, HTTPException):
        return exc.code or 500
    known = classify_exception(exc)
    return (known.code or 500) if known is not None else 500


def created_thread_id(first_write: bytes) -> str | None:
    """The thread id in a ``thread.created`` first event (threads.create), else None."""
    head = first_write.split(b"\n\n", 1)[0]
    if not head.startswith(b"data: ") or b'"thread.created"' not in head:
        return None
    try:
        thread = json.loads(head[6:]).get("thread") or {}
    except ValueError:
        return None
    thread_id = thread.get("id") if isinstance(thread, dict) else None
    return thread_id if isinstance(thread_id, str) else None


_STREAM_SIGNALS = (
    signals.stream_started,
    signals.stream_finished,
    signals.stream_cancelled,
    signals.stream_failed,
)


class RequestObserver:
    """Sends the request's signals and keeps its span and stream metrics."""

    __slots__ = (
        "_attributes", "_respond_error", "_span", "_token", "app", "context", "op", "started",
        "telemetry", "thread_id",
    )  # fmt: skip

    def __init__(self, state: ChatKitState, op: str, context: Any, thread_id: str | None) -> None:
        self.app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        self.started = time.monotonic()
        self.op = op
        self.context = context
        self.thread_id = thread_id
        self.telemetry = state.telemetry
        self._span: Span | None = None
        self._attributes = {"chatkit.op": op}
        self._respond_error = _RespondError()
        _respond_error.set(self._respond_error)
        send_signal(signals.request_received, self.app, op=op, context=context)
        if self.telemetry is not None:
            start: dict[str, Any] = dict(self._attributes)
            if thread_id:
                start["chatkit.thread_id"] = thread_id
            if self.telemetry.record_owner:
                start["chatkit.owner"] = _owner_key(state, context)
            self._span, self._token = self.telemetry.start_span(op, start)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While the view runs: the span is current; an exception ends it with its status."""
        try:
            yield
        except BaseException as exc:
            self._end_span({"http.response.status_code": status_of(exc)}, error_status=exc)
            raise
        finally:
            if self.telemetry is not None:
                self.telemetry.deactivate(self._token)

    def responded(self, status: int) -> None:
        """A plain JSON reply was returned."""
        self._end_span({"http.response.status_code": status, "chatkit.outcome": str(status)})

    def stream_started(self, first_write: bytes | None) -> None:
        if self.thread_id is None and first_write and self._wants_thread_id():
            self.thread_id = created_thread_id(first_write)
        send_signal(
            signals.stream_started,
            self.app,
            op=self.op,
            thread_id=self.thread_id,
            context=self.context,
        )
        if self.telemetry is not None:
            self.telemetry.open_streams.add(1, self._attributes)
            ttfe = time.monotonic() - self.started
            self.telemetry.time_to_first_event.record(ttfe, self._attributes)

    def _wants_thread_id(self) -> bool:
        """Parse the new thread's id out of the first event only when someone listens."""
        return self.telemetry is not None or any(signal.receivers for signal in _STREAM_SIGNALS)

    def stream_ended(
        self, outcome: StreamEnd, stats: StreamStats, exc: BaseException | None
    ) -> None:
        """The bridge's ``on_end``: signals first, then span and metrics."""
        if outcome == "failed" and exc is None:
            exc = stream_failure(stats, self._respond_error)
        if has_app_context():
            self._send_end_signal(outcome, stats, exc)
        else:  # a detached reply finishing on a native thread
            with self.app.app_context():
                self._send_end_signal(outcome, stats, exc)
        telemetry = self.telemetry
        if telemetry is None:
            return
        attributes = self._attributes
        telemetry.open_streams.add(-1, attributes)
        telemetry.stream_duration.record(stats.duration, {**attributes, "chatkit.outcome": outcome})
        telemetry.events.add(stats.events, attributes)
        if outcome == "cancelled":
            telemetry.cancellations.add(1, attributes)
        elif outcome == "failed":
            telemetry.errors.add(1, {**attributes, "error.type": "stream_error"})
        span_attributes: dict[str, Any] = {
            "http.response.status_code": 200,
            "chatkit.outcome": outcome,
            "chatkit.events": stats.events,
            "chatkit.bytes": stats.bytes_sent,
        }
        if stats.time_to_first_event is not None:
            span_attributes["chatkit.time_to_first_event"] = stats.time_to_first_event
        self._end_span(span_attributes, error=exc, failed=outcome == "failed")

    def _send_end_signal(
        self, outcome: StreamEnd, stats: StreamStats, exc: BaseException | None
    ) -> None:
        kwargs: dict[str, Any] = {
            "op": self.op,
            "thread_id": self.thread_id,
            "context": self.context,
            "events": stats.events,
            "duration": stats.duration,
        }
        if outcome == "finished":
            send_signal(signals.stream_finished, self.app, **kwargs)
        elif outcome == "cancelled":
            send_signal(signals.stream_cancelled, self.app, **kwargs)
        else:
            send_signal(signals.stream_failed, self.app, exc=exc, **kwargs)

    def _end_span(
        self,
        attributes: dict[str, Any],
        *,
        error: BaseException | None = None,
        failed: bool = False,
        error_status: BaseException | None = None,
    ) -> None:
        span, self._span = self._span, None
        if span is None or self.telemetry is None:
            return
        if self.thread_id:
            attributes["chatkit.thread_id"] = self.thread_id
        if error_status is not None:  # an HTTP error: a failure only when it is a 5xx
            status = int(attributes["http.response.status_code"])
            attributes["chatkit.outcome"] = str(status)
            if status >= 500:
                error = error_status
        self.telemetry.end_span(span, attributes, error=error, failed=failed)


def attachment_stored(attachment_id: str, size: int | None, context: Any) -> None:
    """An upload route stored an attachment's bytes and row."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    send_signal(
        signals.attachment_stored, app, attachment_id=attachment_id, size=size, context=context
    )


def count_error_response(state: ChatKitState, endpoint: str | None, status: int) -> None:
    """Errors by status code, for every route of the blueprint (after_request)."""
    telemetry = state.telemetry
    if telemetry is not None and status >= 400:
        route = (endpoint or "unknown").removeprefix("chatkit.")
        telemetry.errors.add(1, {"chatkit.route": route, "http.response.status_code": status})


def _owner_key(state: ChatKitState, context: Any) -> str:
    owner_key = getattr(state.store, "owner_key", None)
    try:
        key = owner_key(context) if callable(owner_key) else getattr(context, "user_id", "")
    except Exception:  # a context the store refuses: the request fails later anyway
        key = ""
    return str(key)
