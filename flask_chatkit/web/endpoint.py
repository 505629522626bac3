"""The ChatKit HTTP endpoint: one request, top to bottom.

``POST <prefix>`` goes: origin (403, in ``before_request``) → method (405) → login
with the default context (401) → the body, read once and bounded (413), JSON (415),
parsed once (400) → the request's own checks (400/413) → the context loader → 501 for
an operation the server lacks → the store's checks (404/409/400) → ChatKit. Every
check runs before ChatKit (``web/checks.py``), so a stream never half-starts for a
request that was going to fail.

Where ChatKit runs:

* **Store reads** (``threads.get_by_id``, ``threads.list``, ``items.list``) with the
  SDK's own ``process()`` and the built-in ``SQLAlchemyStore`` on SQLite run right
  here, on the request's greenlet or thread: the store answers synchronously when no
  loop is running. No thread hand-off at all. Anything that could need the loop
  (another store, an overridden ``process()``, PostgreSQL) goes to the loop.
* **Everything else** goes to the worker's loop thread: a plain request is one round
  trip (``LoopThread.run``); a stream is one task that checks, runs ChatKit and pumps
  the result, and this greenlet waits once, for the first chunk.

ChatKit is handed the request parsed here: ``ChatKitServer.process()`` would parse
the raw body again (building a ``TypeAdapter`` per call). With an overridden
``process()``, or an SDK whose ``process()`` changed, the raw body goes to
``process()`` as usual: slower, never wrong.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import AsyncIterable
from typing import Any

from chatkit.logger import logger as sdk_logger
from chatkit.server import ChatKitServer, NonStreamingResult, StreamingResult
from chatkit.types import (
    ChatKitReq,
    ItemsListReq,
    ThreadsGetByIdReq,
    ThreadsListReq,
    is_streaming_req,
)
from chatkit.version import __version__ as sdk_version
from flask import Blueprint, Response, g, request
from werkzeug.exceptions import HTTPException

from ..bridge.loop import NeedsLoop, Outcome, run_inline
from ..bridge.stream import Stream
from ..context import new_request_id, require_login
from ..errors import (
    ChatKitHTTPException,
    classify_exception,
    error_response,
    http_exception_response,
    method_not_allowed,
)
from ..state import ChatKitState, get_state
from ..storage.sql import SQLAlchemyStore
from .checks import check_against_store, check_implemented, check_request
from .observe import RequestObserver, count_error_response
from .request_body import parse_request, request_body, serialize_request
from .response import ContextKeepingBody, url_rewriter
from .security import apply_cors, check_origin, preflight_response

logger = logging.getLogger("flask_chatkit")

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
ALL_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_blueprint(*, console: bool = False, health: bool = True) -> Blueprint:
    # No static folder: the console page is read by its own view, so nothing of
    # it is served (not even <prefix>/static/console.html) while it is off.
    bp = Blueprint("chatkit", __name__)
    # Every method reaches the view so a wrong one gets the JSON 405, not HTML.
    bp.add_url_rule("", "endpoint", chatkit_endpoint, methods=ALL_METHODS, strict_slashes=False)
    from .uploads import register_attachment_routes

    register_attachment_routes(bp, ALL_METHODS)
    # Unknown paths under the prefix get the JSON 404 too, not Flask's HTML page.
    bp.add_url_rule("/<path:unknown>", "unknown", _unknown_path, methods=ALL_METHODS)
    if health:  # off: the JSON 404 of unknown paths
        from .health import health_view

        bp.add_url_rule("/health", "health", health_view, methods=ALL_METHODS)
    if console:
        from .console import console_view

        bp.add_url_rule("/console", "console", console_view, methods=["GET"])
    bp.before_request(_before_request)
    bp.after_request(_after_request)
    bp.register_error_handler(HTTPException, _handle_http_exception)
    bp.register_error_handler(Exception, _handle_exception)
    return bp


def _before_request() -> Response | None:
    # A caller's X-Request-ID (e.g. from a proxy) is kept when it is a plain token.
    incoming = request.headers.get("X-Request-ID", "")
    g.chatkit_request_id = incoming if REQUEST_ID_RE.fullmatch(incoming) else new_request_id()
    settings = get_state().settings
    check_origin(settings)
    if request.method == "OPTIONS":
        return preflight_response(settings)
    return None


def _after_request(response: Response) -> Response:
    response.headers.setdefault("X-Request-ID", g.get("chatkit_request_id", ""))
    state = get_state()
    apply_cors(response, state.settings)
    if state.telemetry is not None:
        count_error_response(state, request.endpoint, response.status_code)
    return response


def _handle_http_exception(exc: HTTPException) -> Response:
    return http_exception_response(exc)


def _handle_exception(exc: Exception) -> Response:
    known = classify_exception(exc)
    if known is not None:
        if known.code == 503:
            logger.warning(
                "database unavailable (request %s): %s", g.get("chatkit_request_id"), exc
            )
        return http_exception_response(known)
    request_id = g.get("chatkit_request_id", "-")
    logger.exception("ChatKit request %s failed", request_id)
    return error_response(500, f"Internal server error (request id {request_id}).")


def _unknown_path(unknown: str) -> Response:
    raise ChatKitHTTPException(404, "No such ChatKit route.")


def chatkit_endpoint() -> Response:
    if request.method != "POST":
        raise method_not_allowed(request.method, "POST, OPTIONS")
    state = get_state()
    settings = state.settings
    state.check_setup()
    if state.uses_default_context:
        require_login()  # 401 before reading the body (custom loaders need the payload)
    body = request_body(settings.max_request_bytes)  # read once (hooks may have read it)
    if request.mimetype != "application/json":
        raise ChatKitHTTPException(415, "ChatKit requests must be sent as application/json.")
    parsed = parse_request(body)
    if check_request(parsed, settings):  # clamped a page limit or dropped repeated ids
        body = serialize_request(parsed)
    context = state.context_loader(request, parsed.metadata)
    parsed.metadata = {}  # ChatKit never reads it: only the context keeps its copy
    check_implemented(state.server, parsed)  # 501 before any store work
    state.ensure_schema()
    thread_id = getattr(parsed.params, "thread_id", None)
    observer = RequestObserver(state, parsed.type, context, thread_id)
    with observer.active():  # the request's span is current while ChatKit runs
        return run_chatkit(state, parsed, body, context, observer)


def run_chatkit(
    state: ChatKitState,
    parsed: ChatKitReq,
    body: bytes,
    context: Any,
    observer: RequestObserver,
) -> Response:
    server = state.server

    async def checked_process() -> StreamingResult | NonStreamingResult:
        await check_against_store(server.store, parsed, context, state.attachment_store)
        return await process(server, parsed, body, context)

    # Stored attachment URLs are relative; they become absolute on a trusted base here.
    rewrite = url_rewriter(settings=state.settings)
    if isinstance(parsed, INLINE_REQUESTS) and answers_inline(server):
        try:
            result = run_inline(checked_process())
        except NeedsLoop:  # a read: safe to run again, on the loop
            result = None
        if isinstance(result, NonStreamingResult):
            observer.responded(200)
            return Response(rewrite(result.json), mimetype="application/json")

    # Flask's app/request contexts and Flask-Login's user live in contextvars:
    # the copy makes them visible inside respond() on the loop thread.
    ctx = contextvars.copy_context()

    async def prepare() -> AsyncIterable[bytes] | Outcome:
        result = await checked_process()
        if isinstance(result, StreamingResult):
            return result
        return Outcome(result)  # plain, or an overridden process()'s choice

    if is_streaming_req(parsed):
        # One task on the loop checks, runs ChatKit and pumps the stream; this
        # greenlet/thread waits once, for the first chunk (or an error, or a
        # plain result from an overridden process()).
        stream = new_stream(state, ctx, observer)
        stream.start(prepare)
        first = stream.first()
    else:
        plain = state.loop_thread.run(checked_process, ctx)
        if not isinstance(plain, StreamingResult):
            observer.responded(200)
            return Response(rewrite(plain.json), mimetype="application/json")
        stream = new_stream(state, ctx, observer, plain)  # an overridden process()
        stream.start()
        first = stream.first()
    if isinstance(first, Outcome):  # ended before any byte: still a plain HTTP response
        result = first.unwrap()
        observer.responded(200)
        return Response(rewrite(result.json), mimetype="application/json")
    observer.stream_started(first)
    return Response(
        ContextKeepingBody(stream, rewrite), mimetype="text/event-stream", headers=SSE_HEADERS
    )


def new_stream(
    state: ChatKitState,
    ctx: contextvars.Context,
    observer: RequestObserver,
    source: AsyncIterable[bytes] | None = None,
) -> Stream:
    settings = state.settings
    return Stream(
        state.loop_thread,
        source,
        ctx,
        heartbeat=settings.heartbeat_seconds,
        cancel_timeout=settings.cancel_timeout,
        on_disconnect=settings.on_disconnect,
        on_end=observer.stream_ended,
        started=observer.started,
    )


# -- running ChatKit on the parsed request --------------------------------------------
# Requests that only read the store: answered inline when answers_inline() allows.
INLINE_REQUESTS = (ThreadsGetByIdReq, ThreadsListReq, ItemsListReq)
_STORE_READS = ("load_thread", "load_threads", "load_thread_items")

# The SDK internals process() calls; checked once per server class.
_SDK_HANDLERS = ("_process_streaming", "_process_non_streaming")
# Every global and attribute the SDK's own process() touched when this was written
# (openai-chatkit 1.x). If an SDK release changes process(), this set changes and
# the view falls back to calling process() itself: slower, never wrong.
_KNOWN_PROCESS_NAMES = frozenset(
    {
        "NonStreamingResult", "StreamingResult", "TypeAdapter", "ChatKitReq",
        "validate_json", "logger", "info", "type", "is_streaming_req",
        "_process_streaming", "_process_non_streaming",
    }
)  # fmt: skip
SDK_PROCESS_UNCHANGED = sdk_version.split(".")[0] == "1" and (
    frozenset(ChatKitServer.process.__code__.co_names) == _KNOWN_PROCESS_NAMES
)


def uses_sdk_process(server: ChatKitServer[Any]) -> bool:
    cls = type(server)
    return (
        SDK_PROCESS_UNCHANGED
        and cls.process is ChatKitServer.process
        and all(callable(getattr(cls, hook, None)) for hook in _SDK_HANDLERS)
    )


def answers_inline(server: ChatKitServer[Any]) -> bool:
    """Whether a store read may run on the request's own greenlet or thread.

    Only with the SDK's ``process()`` over ``SQLAlchemyStore``'s own read methods
    (possibly behind the telemetry wrapper): those never need a running loop. Only on
    SQLite: on PostgreSQL, reads through the loop and the store's threads measured
    faster than psycopg's waits on the request's greenlet (docs: performance).
    """
    store = getattr(server.store, "inner", server.store)  # telemetry's TimedStore
    return (
        uses_sdk_process(server)
        and isinstance(store, SQLAlchemyStore)
        and store.dialect == "sqlite"
        and all(
            getattr(type(store), name) is getattr(SQLAlchemyStore, name) for name in _STORE_READS
        )
    )


async def process(
    server: ChatKitServer[Any], request: ChatKitReq, raw_body: bytes, context: Any
) -> StreamingResult | NonStreamingResult:
    """Equivalent of ``server.process(raw_body, context)`` for an already parsed request."""
    if not uses_sdk_process(server):
        return await server.process(raw_body, context)
    sdk_logger.info(f"Received request op: {request.type}")
    if is_streaming_req(request):
        return StreamingResult(server._process_streaming(request, context))
    return NonStreamingResult(await server._process_non_streaming(request, context))
