"""Test apps for signals and OpenTelemetry under a real gunicorn.

``gunicorn 'tests.signal_app:gunicorn_app()'``: signal receivers append JSON
lines to ``CHATKIT_TEST_SIGNAL_LOG`` — the usage accounting a README reader
would write (who had which reply finished or cancelled), run for real.
``gunicorn 'tests.signal_app:otel_app()'``: the OpenTelemetry SDK writes spans
to ``CHATKIT_TEST_SPANS``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Flask, current_app

from flask_chatkit import signals

from .apps import ScriptedServer, create_test_app
from .apps import gunicorn_app as base_app
from .memory_store import MemoryStore


class SpanningServer(ScriptedServer):
    """Creates a span of its own inside ``respond``, as an app would around an API call."""

    def before_reply(self, options: Any, input: Any, context: Any) -> None:
        from opentelemetry import trace

        with trace.get_tracer("my-app").start_as_current_span("user-work"):
            super().before_reply(options, input, context)


def gunicorn_app() -> Flask:
    app = base_app()
    log_path = os.environ["CHATKIT_TEST_SIGNAL_LOG"]

    def record(name: str, context: Any, **fields: Any) -> None:
        line = {"signal": name, "user": context.user_id, "app": current_app.name, **fields}
        with open(log_path, "a") as log:
            log.write(json.dumps(line) + "\n")

    @signals.stream_finished.connect_via(app)
    def on_finished(sender: Flask, context: Any, events: int, **extra: Any) -> None:
        record("stream_finished", context, events=events)

    @signals.stream_cancelled.connect_via(app)
    def on_cancelled(sender: Flask, context: Any, events: int, **extra: Any) -> None:
        record("stream_cancelled", context, events=events)

    app.config["_signal_receivers"] = (on_finished, on_cancelled)  # keep them referenced
    return app


def otel_app() -> Flask:
    """The test app with the OpenTelemetry SDK: spans as JSON lines in ``CHATKIT_TEST_SPANS``."""
    from collections.abc import Sequence

    from opentelemetry import trace
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    spans_path = os.environ["CHATKIT_TEST_SPANS"]

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(spans_path, "a") as out:
                for span in spans:
                    out.write(json.dumps({
                        "name": span.name,
                        "trace": span.context.trace_id,
                        "id": span.context.span_id,
                        "parent": span.parent.span_id if span.parent else None,
                        "attributes": dict(span.attributes or {}),
                    }) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)
    app = create_test_app(server_cls=SpanningServer, store=MemoryStore())
    FlaskInstrumentor().instrument_app(app)
    return app
