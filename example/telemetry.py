"""OpenTelemetry for the demo: ``OTEL_TRACES_EXPORTER=console`` prints each span as JSON.

``OTEL_METRICS_EXPORTER=console`` also prints the metrics every
``OTEL_METRIC_EXPORT_INTERVAL`` ms (default 60 000). Needs ``opentelemetry-sdk``
(and, for the Flask server span around each ChatKit span,
``opentelemetry-instrumentation-flask``); both are in the ``dev`` extra.
Configured before ``ChatKit(app, …)`` so flask-chatkit sees the providers.
"""

from __future__ import annotations

import logging
import os

from flask import Flask

logger = logging.getLogger(__name__)


def setup_console_telemetry(app: Flask) -> bool:
    """Wire the console exporters the environment asks for; True when tracing is on."""
    traces = os.environ.get("OTEL_TRACES_EXPORTER") == "console"
    metrics_on = os.environ.get("OTEL_METRICS_EXPORTER") == "console"
    if not (traces or metrics_on):
        return False
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import (
            ConsoleMetricExporter,
            PeriodicExportingMetricReader,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        logger.warning("OTEL_*_EXPORTER=console needs: pip install opentelemetry-sdk")
        return False
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "chatkit-demo")}
    )
    if traces and not _is_sdk(trace.get_tracer_provider()):
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        trace.set_tracer_provider(provider)
    if metrics_on and not _is_sdk(metrics.get_meter_provider()):
        reader = PeriodicExportingMetricReader(ConsoleMetricExporter())
        metrics.set_meter_provider(MeterProvider(resource=resource, metric_readers=[reader]))
    try:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor
    except ImportError:
        return traces  # ChatKit spans then start their own traces
    FlaskInstrumentor().instrument_app(app)
    return traces


def _is_sdk(provider: object) -> bool:
    """A provider set earlier in this process (a second create_app must not replace it)."""
    return type(provider).__module__.startswith("opentelemetry.sdk")
