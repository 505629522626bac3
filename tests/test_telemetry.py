"""OpenTelemetry spans and metrics, with the real SDK's in-memory exporter and reader."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from chatkit.errors import CustomStreamError, ErrorCode, StreamError
from flask import Flask
from flask.testing import FlaskClient
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opentelemetry.util._once import Once

from flask_chatkit import SQLAlchemyStore, signals
from flask_chatkit.telemetry import TimedStore
from flask_chatkit.web.observe import ChatKitErrorEvent

from .apps import ScriptedServer, create_test_app
from .gunicorn import ROOT
from .helpers import created_thread_id, login_as, sse_data, thread_id_of
from .http_client import create_request, read_until_delta
from .memory_store import MemoryStore
from .signal_app import SpanningServer


class Otel:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def span(self, name: str) -> ReadableSpan:
        found = [s for s in self.finished() if s.name == name]
        assert len(found) == 1, [s.name for s in self.finished()]
        return found[0]

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found


def _reset_globals() -> None:
    # The API lets a provider be set once per process; tests need their own.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    metrics._internal._METER_PROVIDER_SET_ONCE = Once()
    metrics._internal._METER_PROVIDER = None


@pytest.fixture
def otel() -> Iterator[Otel]:
    setup = Otel()
    _reset_globals()
    trace.set_tracer_provider(setup.tracer_provider)
    metrics.set_meter_provider(setup.meter_provider)
    try:
        yield setup
    finally:
        _reset_globals()
        setup.meter_provider.shutdown()


@pytest.fixture
def app(otel: Otel, store: MemoryStore, tmp_path: Any) -> Flask:
    app = create_test_app(
        store=store, server_cls=SpanningServer, instance_path=str(tmp_path / "instance")
    )
    FlaskInstrumentor().instrument_app(app, tracer_provider=otel.tracer_provider)
    return app


def test_a_chat_turn_is_one_trace_with_the_users_spans_inside(
    client: FlaskClient, alice: Any, otel: Otel
) -> None:
    response = client.post("/chatkit", json=create_request("words=3"))
    events = sse_data(response.get_data())
    thread_id = created_thread_id(events)
    chatkit = otel.span("chatkit threads.create")
    server = next(s for s in otel.finished() if s.name == "POST /chatkit")
    assert server.kind == trace.SpanKind.SERVER
    user = otel.span("user-work")
    assert chatkit.parent is not None and chatkit.parent.span_id == server.context.span_id
    assert user.parent is not None and user.parent.span_id == chatkit.context.span_id
    assert user.context.trace_id == chatkit.context.trace_id == server.context.trace_id
    attributes = dict(chatkit.attributes or {})
    assert attributes["chatkit.op"] == "threads.create"
    assert attributes["chatkit.thread_id"] == thread_id
    assert attributes["chatkit.outcome"] == "finished"
    assert attributes["chatkit.events"] == len(events)
    assert attributes["chatkit.bytes"] == len(response.get_data())
    assert 0 < attributes["chatkit.time_to_first_event"] < 10
    assert attributes["http.response.status_code"] == 200
    assert "chatkit.owner" not in attributes  # off by default: personal data
    assert chatkit.status.status_code == StatusCode.UNSET


def test_owner_key_is_recorded_only_when_asked(
    otel: Otel, store: MemoryStore, tmp_path: Any
) -> None:
    app = create_test_app(
        store=store, instance_path=str(tmp_path / "i"), CHATKIT_OTEL_RECORD_OWNER=True
    )
    client = login_as(app, "alice").client
    client.post("/chatkit", json={"type": "threads.list", "params": {}})
    span = otel.span("chatkit threads.list")
    assert dict(span.attributes or {})["chatkit.owner"] == "alice"
    assert dict(span.attributes or {})["chatkit.outcome"] == "200"


def test_an_http_error_is_the_outcome_and_counted_by_status(
    client: FlaskClient, alice: Any, otel: Otel
) -> None:
    response = client.post(
        "/chatkit",
        json={"type": "threads.get_by_id", "params": {"thread_id": "thr_nope"}},
    )
    assert response.status_code == 404
    span = otel.span("chatkit threads.get_by_id")
    attributes = dict(span.attributes or {})
    assert attributes["chatkit.outcome"] == "404"
    assert attributes["http.response.status_code"] == 404
    assert attributes["chatkit.thread_id"] == "thr_nope"
    assert span.status.status_code == StatusCode.UNSET  # a client error, not our failure
    client.post("/chatkit", data=b"{", content_type="application/json")  # 400 before parsing
    errors = {
        (p.attributes["http.response.status_code"], p.attributes["chatkit.route"]): p.value
        for p in otel.points("chatkit.errors")
    }
    assert errors == {(404, "endpoint"): 1, (400, "endpoint"): 1}


def test_a_failed_stream_marks_the_span_as_error(
    client: FlaskClient, alice: Any, otel: Otel
) -> None:
    response = client.post("/chatkit", json=create_request("fail=1"))
    assert sse_data(response.get_data())[-1]["type"] == "error"
    span = otel.span("chatkit threads.create")
    assert dict(span.attributes or {})["chatkit.outcome"] == "failed"
    assert span.status.status_code == StatusCode.ERROR
    assert any(
        e.name == "exception" and "respond failed on purpose" in str(e.attributes)
        for e in span.events
    )
    errors = [p for p in otel.points("chatkit.errors") if p.attributes.get("error.type")]
    assert [(p.attributes["error.type"], p.value) for p in errors] == [("stream_error", 1)]


def test_stream_metrics(client: FlaskClient, alice: Any, otel: Otel, app: Flask) -> None:
    finished = sse_data(client.post("/chatkit", json=create_request("words=5")).get_data())
    response = client.post(
        "/chatkit", json=create_request("words=500 delay=0.01"), buffered=False
    )
    read_until_delta(response)
    response.close()  # the client left: cancelled
    assert app.extensions["chatkit"].server.cancelled == 1

    (open_streams,) = otel.points("chatkit.streams.open")
    assert open_streams.value == 0  # +1 at the first byte, -1 at the end, for both
    (events,) = otel.points("chatkit.stream.events")
    assert len(finished) < events.value < len(finished) + 500
    (ttfe,) = otel.points("chatkit.stream.time_to_first_event")
    assert ttfe.count == 2 and 0 < ttfe.sum < 10
    durations = {p.attributes["chatkit.outcome"]: p.count for p in otel.points(
        "chatkit.stream.duration")}
    assert durations == {"finished": 1, "cancelled": 1}
    (cancels,) = otel.points("chatkit.stream.cancellations")
    assert cancels.value == 1 and cancels.attributes["chatkit.op"] == "threads.create"
    store_ops = {p.attributes["chatkit.store.operation"]: p.count for p in otel.points(
        "chatkit.store.duration")}
    assert store_ops["save_thread"] >= 2 and store_ops["add_thread_item"] >= 2
    assert isinstance(app.extensions["chatkit"].server.store, TimedStore)


def test_without_opentelemetry_configured_nothing_of_ours_is_imported(tmp_path: Any) -> None:
    script = f"""
import sys
from tests.apps import create_test_app
from tests.memory_store import MemoryStore
app = create_test_app(store=MemoryStore(), instance_path={str(tmp_path)!r})
client = app.test_client()
client.post("/login/alice")
assert client.post("/chatkit", json={{"type": "threads.list", "params": {{}}}}).status_code == 200
body = client.post("/chatkit", json={{"type": "threads.create", "params": {{"input": {{
    "content": [{{"type": "input_text", "text": "words=2"}}], "attachments": [],
    "inference_options": {{}}}}}}}}).get_data()
assert b"thread.item.done" in body
assert app.extensions["chatkit"].telemetry is None
assert app.extensions["chatkit"].server.store.__class__ is MemoryStore
# The OpenTelemetry API itself may be imported by ChatKit's own dependencies (mcp).
print(sorted(m for m in sys.modules if m.startswith("flask_chatkit.telemetry")))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_installed_but_unconfigured_opentelemetry_stays_off(
    store: MemoryStore, tmp_path: Any
) -> None:
    _reset_globals()  # the API's default (proxy) providers, as in an app that set none
    app = create_test_app(store=store, instance_path=str(tmp_path / "i"))
    assert app.extensions["chatkit"].telemetry is None
    assert not isinstance(app.extensions["chatkit"].server.store, TimedStore)


def test_sql_store_is_timed_and_stays_the_apps_store(otel: Otel, tmp_path: Any) -> None:
    app = create_test_app(
        store=None,
        instance_path=str(tmp_path / "i"),
        CHATKIT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )
    state = app.extensions["chatkit"]
    assert isinstance(state.store, SQLAlchemyStore)  # what the CLI and Alembic work with
    assert isinstance(state.server.store, TimedStore) and state.server.store.inner is state.store
    kit = login_as(app, "alice")
    thread_id = created_thread_id(kit.create_thread("words=2"))
    kit.add_user_message(thread_id, "words=1")
    assert [item.type for item in kit.list_items(thread_id).data] == [
        "user_message", "assistant_message", "user_message", "assistant_message"]
    store_ops = {p.attributes["chatkit.store.operation"]: p for p in otel.points(
        "chatkit.store.duration")}
    assert {"load_thread", "save_thread", "add_thread_item", "load_thread_items"} <= set(store_ops)
    assert all(0 < p.sum < 10 for p in store_ops.values())


class StreamErrorServer(ScriptedServer):
    """``respond`` raises the SDK's own stream errors: ``raise=stream`` or ``raise=custom``."""

    def before_reply(self, options: Any, input: Any, context: Any) -> None:
        if options.get("raise") == "stream":
            raise StreamError(ErrorCode.STREAM_ERROR, allow_retry=False)
        if options.get("raise") == "custom":
            raise CustomStreamError("The model is busy, try again.")
        super().before_reply(options, input, context)


@pytest.mark.parametrize(
    ("kind", "code", "message"),
    [("stream", "stream.error", None), ("custom", "custom", "The model is busy, try again.")],
)
def test_a_stream_error_raised_in_respond_is_a_failed_stream(
    otel: Otel, tmp_path: Any, kind: str, code: str, message: str | None
) -> None:
    # ChatKit turns these into an error event without logging them: the stream still
    # ends as failed, for the signal and for the span.
    app = create_test_app(
        store=MemoryStore(), server_cls=StreamErrorServer, instance_path=str(tmp_path / "i")
    )
    failed: list[dict[str, Any]] = []
    finished: list[Any] = []

    def on_failed(sender: Flask, **fields: Any) -> None:
        failed.append(fields)

    def on_finished(sender: Flask, **fields: Any) -> None:
        finished.append(fields)

    signals.stream_failed.connect(on_failed, app)
    signals.stream_finished.connect(on_finished, app)
    try:
        client = login_as(app, "alice").client
        response = client.post("/chatkit", json=create_request(f"raise={kind}"))
        events = sse_data(response.get_data())
    finally:
        signals.stream_failed.disconnect(on_failed, app)
        signals.stream_finished.disconnect(on_finished, app)
    assert events[-1]["type"] == "error" and events[-1]["code"] == code
    thread_id = thread_id_of(events)

    assert finished == []
    (fields,) = failed
    assert fields["op"] == "threads.create" and fields["thread_id"] == thread_id
    assert fields["context"].user_id == "alice"
    exc = fields["exc"]
    assert isinstance(exc, ChatKitErrorEvent)
    assert (exc.code, exc.message) == (code, message)

    span = otel.span("chatkit threads.create")
    attributes = dict(span.attributes or {})
    assert attributes["chatkit.outcome"] == "failed"
    assert attributes["chatkit.thread_id"] == thread_id
    assert span.status.status_code == StatusCode.ERROR
    errors = [p for p in otel.points("chatkit.errors") if p.attributes.get("error.type")]
    assert [(p.attributes["error.type"], p.value) for p in errors] == [("stream_error", 1)]
