"""OpenTelemetry spans and metrics for ChatKit requests (extra ``flask-chatkit[otel]``).

Only imported when an OpenTelemetry tracer or meter provider is configured
(see ``web/observe.py``): without one, nothing here is loaded and requests
pay nothing (the OpenTelemetry API itself may still be imported by ChatKit's
own dependencies; it is never called). Uses the OpenTelemetry API only; the SDK is the app's choice.

Per request: a span ``chatkit <op>`` (a child of the Flask server span when
``opentelemetry-instrumentation-flask`` is active), current while ChatKit
runs, so spans created inside ``respond`` nest under it. Per stream, numbers
are counted as it runs and recorded once at its end — never per event.
Imports nothing of Flask.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Mapping
from typing import Any, TypeVar

from chatkit.store import Store, StoreItemType
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode

T = TypeVar("T")

SCOPE = "flask_chatkit"
# Seconds, from a fast store call to a long reply.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Telemetry:
    """The tracer and instruments of one process (shared by its apps)."""

    def __init__(self, *, record_owner: bool = False) -> None:
        self.record_owner = record_owner
        self.tracer = trace.get_tracer(SCOPE)
        meter = metrics.get_meter(SCOPE)
        self.open_streams = meter.create_up_down_counter(
            "chatkit.streams.open", unit="{stream}", description="Streams being sent now."
        )
        self.time_to_first_event = meter.create_histogram(
            "chatkit.stream.time_to_first_event",
            unit="s",
            description="From the request to the stream's first event.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )
        self.stream_duration = meter.create_histogram(
            "chatkit.stream.duration",
            unit="s",
            description="From the request to the stream's end.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.events = meter.create_counter(
            "chatkit.stream.events", unit="{event}", description="ChatKit events sent."
        )
        self.cancellations = meter.create_counter(
            "chatkit.stream.cancellations",
            unit="{stream}",
            description="Replies cancelled because the client left or the worker stopped.",
        )
        self.errors = meter.create_counter(
            "chatkit.errors",
            unit="{error}",
            description="Error responses by HTTP status, and streams that failed after starting.",
        )
        self.store_duration = meter.create_histogram(
            "chatkit.store.duration",
            unit="s",
            description="Latency of ChatKit store operations.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )

    # -- spans ------------------------------------------------------------------

    def start_span(self, op: str, attributes: Mapping[str, Any]) -> tuple[Span, object]:
        """Start ``chatkit <op>`` under the current span and make it current.

        Returns the span and the token for :meth:`deactivate` (same context only).
        """
        span = self.tracer.start_span(f"chatkit {op}", attributes=dict(attributes))
        token = otel_context.attach(trace.set_span_in_context(span))
        return span, token

    @staticmethod
    def deactivate(token: object) -> None:
        otel_context.detach(token)  # type: ignore[arg-type]

    @staticmethod
    def end_span(
        span: Span,
        attributes: Mapping[str, Any],
        *,
        error: BaseException | None = None,
        failed: bool = False,
    ) -> None:
        span.set_attributes(dict(attributes))
        if error is not None:
            span.record_exception(error)
        if failed or error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__ if error else None))
        span.end()

    # -- store ------------------------------------------------------------------

    def wrap_store(self, store: Store[Any]) -> Store[Any]:
        if isinstance(store, TimedStore):
            return store
        return TimedStore(store, self)


class TimedStore(Store[Any]):
    """Delegates every call to ``inner`` and records each operation's latency.

    Anything else (``owner_key``, ``create_all``, ``defer_new_thread``…) is
    forwarded as is.
    """

    def __init__(self, inner: Store[Any], telemetry: Telemetry) -> None:
        self.inner = inner
        self._histogram = telemetry.store_duration

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        start = time.perf_counter()
        try:
            return await call
        finally:
            self._histogram.record(
                time.perf_counter() - start, {"chatkit.store.operation": operation}
            )

    def generate_thread_id(self, context: Any) -> str:
        return self.inner.generate_thread_id(context)

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: Any
    ) -> str:
        return self.inner.generate_item_id(item_type, thread, context)

    async def load_thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        return await self._timed("load_thread", self.inner.load_thread(thread_id, context))

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        await self._timed("save_thread", self.inner.save_thread(thread, context))

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: Any
    ) -> Page[ThreadItem]:
        call = self.inner.load_thread_items(thread_id, after, limit, order, context)
        return await self._timed("load_thread_items", call)

    async def save_attachment(self, attachment: Attachment, context: Any) -> None:
        await self._timed("save_attachment", self.inner.save_attachment(attachment, context))

    async def load_attachment(self, attachment_id: str, context: Any) -> Attachment:
        call = self.inner.load_attachment(attachment_id, context)
        return await self._timed("load_attachment", call)

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        call = self.inner.delete_attachment(attachment_id, context)
        await self._timed("delete_attachment", call)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: Any
    ) -> Page[ThreadMetadata]:
        call = self.inner.load_threads(limit, after, order, context)
        return await self._timed("load_threads", call)

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self._timed("add_thread_item", self.inner.add_thread_item(thread_id, item, context))

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self._timed("save_item", self.inner.save_item(thread_id, item, context))

    async def load_item(self, thread_id: str, item_id: str, context: Any) -> ThreadItem:
        return await self._timed("load_item", self.inner.load_item(thread_id, item_id, context))

    async def delete_thread(self, thread_id: str, context: Any) -> None:
        await self._timed("delete_thread", self.inner.delete_thread(thread_id, context))

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Any) -> None:
        call = self.inner.delete_thread_item(thread_id, item_id, context)
        await self._timed("delete_thread_item", call)
