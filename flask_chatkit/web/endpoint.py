"""The ChatKit HTTP endpoint: one request, top to bottom.

``POST <prefix>`` goes: origin (403, in ``before_request``) → method (405) → login
with the default context (401) → the body, read once and bounded (413), JSON (415),
parsed once (400) → the request's own checks (400/413) → the context loader → 501 for
an operation the server lacks → the store's checks (404/409/400) → ChatKit. Every
check runs before ChatKit (``web/checks.py``), so a stream never half-starts for a
request that was going to fail.

Where ChatKit runs:

* **Store reads** (``threads.get_by_id``, ``threads.list``, ``items.list``) with the
  SDK's own ``process()`` and the built-in ``SQLAlchemyStore`` on SQLite or on
  PostgreSQL through psycopg run right here, on the request's greenlet or thread: the
  store answers synchronously when no loop is running. No thread hand-off at all.
  Anything that could need the loop (another store or driver, an overridden
  ``process()``) goes to the loop.
* **Everything else** goes to the worker's loop (a greenlet on the hub under gevent,
  a native thread otherwise): a plain request is one round trip
  (``LoopThread.run``); a stream is one task that checks, runs ChatKit and pumps the
  result, and this greenlet waits once, for the first chunk.

ChatKit is handed the request parsed here: ``ChatKitServer.process()`` would parse
the raw body again (building a ``TypeAdapter`` per call). With an overridden
``process()``, or an SDK whose ``process()`` changed, the raw body goes to
``process()`` as usual: slower, never wrong.

**Checkpoints** (``CHATKIT_CHECKPOINT_SECONDS``): with the SDK's own ``process()`` a
stream iterates ChatKit's events here (:func:`checkpointed_stream`) and every that
many seconds saves the assistant message being streamed, so a worker killed
mid-reply leaves the text so far under the item id the client saw. With an
overridden ``process()`` (or a store without ``save_checkpoints``) there are none.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import re
import weakref
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import Any

from chatkit.errors import ErrorCode
from chatkit.logger import logger as sdk_logger
from chatkit.server import ChatKitServer, NonStreamingResult, StreamingResult
from chatkit.types import (
    AssistantMessageContentPartAdded,
    AssistantMessageContentPartDone,
    AssistantMessageContentPartTextDelta,
    AssistantMessageItem,
    ChatKitReq,
    ErrorEvent,
    ItemsListReq,
    StreamingReq,
    ThreadItemAddedEvent,
    ThreadItemDoneEvent,
    ThreadItemRemovedEvent,
    ThreadItemReplacedEvent,
    ThreadItemUpdatedEvent,
    ThreadsGetByIdReq,
    ThreadsListReq,
    is_streaming_req,
)
from chatkit.version import __version__ as sdk_version
from flask import Blueprint, Response, g, request
from werkzeug.exceptions import HTTPException

from ..bridge.loop import NeedsLoop, Outcome, run_inline
from ..bridge.native import native_lock
from ..bridge.stream import Stream, StreamEnd, StreamStats
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
from .request_body import end_connection, parse_request, request_body, serialize_request
from .response import ContextKeepingBody, StreamResponse, url_rewriter
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
    slow_client = g.pop("_chatkit_end_connection", None)  # a 408: its body never came
    if slow_client is not None:
        response.call_on_close(lambda: end_connection(slow_client))
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
            what = "attachment storage" if known.error_code == "storage_unavailable" else "database"
            logger.warning(
                "%s unavailable (request %s): %s", what, g.get("chatkit_request_id"), exc
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
        return await process(
            server, parsed, body, context, checkpoint_seconds=state.settings.checkpoint_seconds
        )

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
    # the copy makes them visible inside respond() on the loop.
    ctx = contextvars.copy_context()

    async def prepare() -> AsyncIterable[bytes] | Outcome:
        result = await checked_process()
        if isinstance(result, StreamingResult):
            return result
        return Outcome(result)  # plain, or an overridden process()'s choice

    # A stream holds a slot of its owner from here until it ends (429 past the cap).
    release: Callable[[], None] | None = None
    try:
        if is_streaming_req(parsed):
            release = STREAM_SLOTS.claim(state, context)
            # One task on the loop checks, runs ChatKit and pumps the stream; this
            # greenlet/thread waits once, for the first chunk (or an error, or a
            # plain result from an overridden process()).
            stream = new_stream(state, ctx, observer, release=release)
            stream.start(prepare)
            first = stream.first()
        else:
            plain = state.loop_thread.run(checked_process, ctx)
            if not isinstance(plain, StreamingResult):
                observer.responded(200)
                return Response(rewrite(plain.json), mimetype="application/json")
            release = STREAM_SLOTS.claim(state, context)
            stream = new_stream(state, ctx, observer, plain, release)  # an overridden process()
            stream.start()
            first = stream.first()
        if isinstance(first, Outcome):  # ended before any byte: still a plain HTTP response
            release()
            result = first.unwrap()
            observer.responded(200)
            return Response(rewrite(result.json), mimetype="application/json")
    except BaseException:
        if release is not None:  # a failure before any byte: the stream never ran
            release()
        raise
    observer.stream_started(first)
    return StreamResponse(ContextKeepingBody(stream, rewrite), SSE_HEADERS)


def new_stream(
    state: ChatKitState,
    ctx: contextvars.Context,
    observer: RequestObserver,
    source: AsyncIterable[bytes] | None = None,
    release: Callable[[], None] | None = None,
) -> Stream:
    settings = state.settings
    on_end: Callable[[StreamEnd, StreamStats, BaseException | None], None]
    on_end = observer.stream_ended if release is None else _releasing(release, observer)
    return Stream(
        state.loop_thread,
        source,
        ctx,
        heartbeat=settings.heartbeat_seconds,
        cancel_timeout=settings.cancel_timeout,
        on_disconnect=settings.on_disconnect,
        on_end=on_end,
        started=observer.started,
    )


# -- open streams per user ---------------------------------------------------------
# A client told to wait for one of its own streams to end.
STREAM_RETRY_AFTER = 5


class StreamSlots:
    """Open streams per owner key in this worker process, capped at
    ``CHATKIT_MAX_STREAMS_PER_USER``: one user holding hundreds of streams that
    never read slowed every other user of the worker (figures: docs, benchmarks).

    A dict of counts behind a native lock (a detached stream ends on a native
    executor thread; the lock is held only for a dict update, never across I/O).
    Counted per process: each gunicorn worker has its own, so a user may hold the
    cap in every worker.
    """

    def __init__(self) -> None:
        self._lock = native_lock()
        self._open: dict[tuple[int, str], int] = {}

    def open_count(self, state: ChatKitState, owner: str) -> int:
        return self._open.get((id(state), owner), 0)

    def claim(self, state: ChatKitState, context: Any) -> Callable[[], None]:
        """Take a slot of the context's owner, or raise 429; returns the (idempotent) release."""
        key = (id(state), owner_key(state, context))
        cap = state.settings.max_streams_per_user
        with self._lock:
            count = self._open.get(key, 0)
            if count >= cap:
                raise ChatKitHTTPException(
                    429,
                    f"Too many open streams: at most {cap} per user; wait for one of yours to end.",
                    "rate_limited",
                    headers={"Retry-After": str(STREAM_RETRY_AFTER)},
                )
            self._open[key] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                left = self._open.get(key, 1) - 1
                if left > 0:
                    self._open[key] = left
                else:
                    self._open.pop(key, None)

        return release


STREAM_SLOTS = StreamSlots()


def owner_key(state: ChatKitState, context: Any) -> str:
    """The store's tenant key for ``context`` (``owner_key``), else its ``user_id``."""
    key_of = getattr(state.store, "owner_key", None)
    key = key_of(context) if callable(key_of) else getattr(context, "user_id", "")
    return str(key)


def _releasing(
    release: Callable[[], None], observer: RequestObserver
) -> Callable[[StreamEnd, StreamStats, BaseException | None], None]:
    def on_end(outcome: StreamEnd, stats: StreamStats, exc: BaseException | None) -> None:
        release()  # first: a failing receiver below must not keep the slot
        observer.stream_ended(outcome, stats, exc)

    return on_end


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
    SQLite, and on PostgreSQL through psycopg (3), which waits cooperatively under
    gevent; another driver (psycopg2 without psycogreen) could block the hub, so its
    reads go to the store's threads. Decided once per server and store.
    """
    known = _INLINE_ANSWERS.get(server)
    if known is not None and known[0] is server.store:
        return known[1]
    store = getattr(server.store, "inner", server.store)  # telemetry's TimedStore
    inline = (
        uses_sdk_process(server)
        and isinstance(store, SQLAlchemyStore)
        and (store.dialect, store.engine.dialect.driver) in _INLINE_DRIVERS
        and all(
            getattr(type(store), name) is getattr(SQLAlchemyStore, name) for name in _STORE_READS
        )
    )
    _INLINE_ANSWERS[server] = (server.store, inline)
    return inline


# (dialect, driver) whose reads answer inline: measured faster there than through the
# loop (docs/design/request-flow.md), and never blocking the gevent hub.
_INLINE_DRIVERS = frozenset({("sqlite", "pysqlite"), ("postgresql", "psycopg")})

# server -> (the store it was decided for, the answer)
_INLINE_ANSWERS: weakref.WeakKeyDictionary[ChatKitServer[Any], tuple[Any, bool]] = (
    weakref.WeakKeyDictionary()
)


async def process(
    server: ChatKitServer[Any],
    request: ChatKitReq,
    raw_body: bytes,
    context: Any,
    *,
    checkpoint_seconds: float = 0.0,
) -> StreamingResult | NonStreamingResult:
    """Equivalent of ``server.process(raw_body, context)`` for an already parsed request.

    With ``checkpoint_seconds`` > 0 and a server and store that allow it
    (:func:`checkpoints_possible`), a stream also checkpoints its reply.
    """
    if not uses_sdk_process(server):
        return await server.process(raw_body, context)  # no checkpoints: see the module doc
    sdk_logger.info(f"Received request op: {request.type}")
    if is_streaming_req(request):
        if checkpoint_seconds > 0 and checkpoints_possible(server):
            return StreamingResult(
                checkpointed_stream(server, request, context, checkpoint_seconds)
            )
        return StreamingResult(server._process_streaming(request, context))
    return NonStreamingResult(await server._process_non_streaming(request, context))


# -- checkpoints: a streaming reply saved as it goes -----------------------------------
# Everything the SDK's _process_streaming touched when this was written; if it
# changes, streams go through it unchanged (no checkpoints): never wrong.
_KNOWN_STREAMING_NAMES = frozenset(
    {
        "_process_streaming_impl", "_serialize", "asyncio", "CancelledError", "logger",
        "exception", "Exception",
    }
)  # fmt: skip
SDK_STREAMING_UNCHANGED = SDK_PROCESS_UNCHANGED and (
    frozenset(ChatKitServer._process_streaming.__code__.co_names) <= _KNOWN_STREAMING_NAMES
)


def checkpoints_possible(server: ChatKitServer[Any]) -> bool:
    """Whether a stream of ``server`` can be checkpointed.

    The SDK's own ``process()`` and ``_process_streaming`` (its events are iterated
    here instead), and a store with ``save_checkpoints`` (``SQLAlchemyStore``): a
    checkpoint row must be one the reply's final ``add_thread_item`` replaces, which
    the plain ``Store`` contract does not promise.
    """
    cls = type(server)
    return (
        SDK_STREAMING_UNCHANGED
        and uses_sdk_process(server)
        and cls._process_streaming is ChatKitServer._process_streaming
        and callable(getattr(server, "_update_pending_items", None))
        and callable(getattr(server.store, "save_checkpoints", None))
    )


# Updates whose content object the SDK stores as is in the item it keeps.
_SHARED_CONTENT_UPDATES = (AssistantMessageContentPartAdded, AssistantMessageContentPartDone)


class _Checkpoints:
    """The assistant messages one stream has in flight (written by a :class:`_Ticker`)."""

    __slots__ = (
        "changed", "context", "deltas", "failed", "pending", "saved", "server", "writing",
    )  # fmt: skip

    def __init__(self, server: ChatKitServer[Any], context: Any) -> None:
        self.server = server
        self.context = context
        self.failed: BaseException | None = None  # why a checkpoint could not be written
        self.writing: asyncio.Future[None] | None = None  # the ticker's write with our rows
        # Our own copies (the SDK keeps its own), updated by the SDK's own code.
        self.pending: dict[str, Any] = {}
        # Text deltas not yet applied to ``pending``: (item id, content index, delta).
        # Most events of a reply are deltas, so they are only collected here and
        # applied, joined, when a checkpoint is taken or another update needs them.
        self.deltas: list[tuple[str, int, str]] = []
        self.changed: set[str] = set()  # ids with text not yet checkpointed
        self.saved: set[str] = set()  # ids with a checkpoint row

    def track(self, event: Any) -> None:
        """Follow one event of the stream (cheap: no I/O, no model work for a delta)."""
        if type(event) is ThreadItemUpdatedEvent:
            item_id = event.item_id
            if item_id not in self.pending:
                return
            update = event.update
            if type(update) is AssistantMessageContentPartTextDelta:
                self.deltas.append((item_id, update.content_index, update.delta))
            else:
                self._apply_deltas()  # in order: this update may replace their text
                if isinstance(update, _SHARED_CONTENT_UPDATES):
                    # The SDK puts this content object itself into its own copy of the
                    # item: ours must get another, or every later delta lands twice in it.
                    event = event.model_copy(deep=True)
                self.server._update_pending_items(self.pending, event)
            self.changed.add(item_id)
        elif isinstance(event, ThreadItemAddedEvent):
            if isinstance(event.item, AssistantMessageItem):
                self.pending[event.item.id] = event.item.model_copy(deep=True)
                self.changed.add(event.item.id)
        elif isinstance(event, ThreadItemDoneEvent | ThreadItemReplacedEvent):
            # The SDK has saved the final item (replacing any checkpoint) before it yields.
            self._forget(event.item.id)
        elif isinstance(event, ThreadItemRemovedEvent):
            self._forget(event.item_id)

    def _apply_deltas(self) -> None:
        """Apply the collected deltas to ``pending``, one join per content part."""
        if not self.deltas:
            return
        joined: dict[tuple[str, int], list[str]] = {}
        for item_id, index, delta in self.deltas:
            joined.setdefault((item_id, index), []).append(delta)
        self.deltas.clear()
        for (item_id, index), parts in joined.items():
            item = self.pending.get(item_id)
            if item is None:
                continue
            update = AssistantMessageContentPartTextDelta(content_index=index, delta="".join(parts))
            self.server._update_pending_items(
                self.pending, ThreadItemUpdatedEvent(item_id=item_id, update=update)
            )

    def _forget(self, item_id: str) -> None:
        self.pending.pop(item_id, None)
        self.changed.discard(item_id)
        self.saved.discard(item_id)
        if self.deltas:
            self.deltas = [d for d in self.deltas if d[0] != item_id]

    def take_changed(self) -> list[Any]:
        """The changed items with text, brought up to date, for a checkpoint."""
        self._apply_deltas()
        items = [self.pending[i] for i in self.changed if _has_text(self.pending[i])]
        self.changed.clear()
        return items

    def written(self, items: list[Any], failed: BaseException | None) -> None:
        self.writing = None
        if failed is not None:
            self.failed = failed
            return
        # Rows of items whose final save came meanwhile are final rows now.
        self.saved.update(item.id for item in items if item.id in self.pending)

    async def save_last(self, store: Any) -> BaseException | None:
        """After a reply ended without ChatKit's final save (an error): bring its
        checkpoints up to date, awaited. Returns the store's error, if any.

        A tick's write still holding our rows is waited for first: it knows which
        rows exist, and landing after this newer text it would overwrite it. A
        cancel arriving mid-write is held until the write has landed, then
        re-aimed at the task (the stream is over: nothing else is left to run).
        """
        if self.writing is not None:
            with contextlib.suppress(BaseException):  # its outcome reaches written()
                await asyncio.wait({self.writing})  # the store's own timeouts bound it
        if not (self.saved and self.changed):
            return None
        self.changed.intersection_update(self.saved)
        items = self.take_changed()
        if not items:
            return None
        rows = [(item.thread_id, item, self.context) for item in items]
        write = asyncio.ensure_future(store.save_checkpoints(rows))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await asyncio.wait({write})  # the store's own timeouts bound it
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            return None
        except Exception as exc:
            return exc
        return None


def _has_text(item: Any) -> bool:
    return any(getattr(part, "text", "").strip() for part in item.content)


class _Ticker:
    """Checkpoints every stream of one loop and store at the same ticks, in one write.

    At each multiple of ``interval`` on the loop's clock, the changed replies of
    all its streams go to the store in one ``save_checkpoints`` call: one task,
    one transaction and one statement for the worker, not one per stream (at a
    thousand streams that was most of what checkpoints cost). Two ticks are
    ``interval`` apart, so no more than ``interval`` of a reply is unsaved while
    the store keeps up. A write still running at the next tick means it does not:
    that tick is skipped and its text waits for the next (the store is given
    room instead of a queue). A failed write is handed to each of its streams,
    which end at their next event.

    The items are written as they are (no copies): only this loop changes them,
    and pydantic serializes one item without releasing the GIL, so the store's
    thread sees a consistent item, if anything a newer one.
    """

    def __init__(self, store: Any, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.streams: set[_Checkpoints] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    def add(self, stream: _Checkpoints) -> None:
        self.streams.add(stream)
        if self._timer is None:
            self._schedule()

    def discard(self, stream: _Checkpoints) -> None:
        self.streams.discard(stream)

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        at = (loop.time() // self.interval + 1) * self.interval
        self._timer = loop.call_at(at, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self.streams:
            return  # restarted by the next stream
        self._schedule()
        if self._writing is not None:
            return
        batch = [(stream, stream.take_changed()) for stream in self.streams if stream.changed]
        batch = [(stream, items) for stream, items in batch if items]
        if batch:
            self._writing = asyncio.ensure_future(self._write(batch))
            for stream, _ in batch:
                stream.writing = self._writing

    async def _write(self, batch: list[tuple[_Checkpoints, list[Any]]]) -> None:
        rows = [(item.thread_id, item, stream.context) for stream, items in batch for item in items]
        failed: BaseException | None = None
        try:
            await self.store.save_checkpoints(rows)
        except Exception as exc:
            failed = exc
        finally:
            self._writing = None
        for stream, items in batch:
            stream.written(items, failed)


# loop -> (store id, interval) -> its ticker
_TICKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[int, float], _Ticker]] = (
    weakref.WeakKeyDictionary()
)


def _ticker(store: Any, interval: float) -> _Ticker:
    tickers = _TICKERS.setdefault(asyncio.get_running_loop(), {})
    ticker = tickers.get((id(store), interval))
    if ticker is None or ticker.store is not store:
        ticker = tickers[(id(store), interval)] = _Ticker(store, interval)
    return ticker


async def checkpointed_stream(
    server: ChatKitServer[Any], request: StreamingReq, context: Any, interval: float
) -> AsyncGenerator[bytes, None]:
    """The SDK's ``_process_streaming``, saving the reply every ``interval`` seconds.

    Same bytes, logging and cancellation as the SDK's. At each tick of
    ``interval`` whose text changed, the assistant message in flight is saved
    (:class:`_Ticker`: one write per tick for all streams, never per event),
    while the reply streams on. When that write fails, the
    store is down and nothing more of the reply could be kept: at the next event
    ChatKit's stream is closed and an error event ends the response, instead of
    streaming text that would be lost. A reply ChatKit ended with an error has
    its checkpoint brought up to date once more (its final save, awaited).
    """
    checkpoints = _Checkpoints(server, context)
    ticker = _ticker(server.store, interval)
    ticker.add(checkpoints)
    events = server._process_streaming_impl(request, context)
    try:
        async for event in events:
            yield b"data: " + server._serialize(event) + b"\n\n"
            checkpoints.track(event)
            if checkpoints.failed is not None:
                await _close_quietly(events.aclose())
                logger.warning(
                    "ChatKit reply checkpoint failed; ending the stream: %s", checkpoints.failed
                )
                error = ErrorEvent(code=ErrorCode.STREAM_ERROR, allow_retry=True)
                yield b"data: " + server._serialize(error) + b"\n\n"
                return
    except asyncio.CancelledError:
        raise  # as the SDK: cancellation is not an error
    except Exception:
        sdk_logger.exception("Error while generating streamed response")
        raise
    finally:
        ticker.discard(checkpoints)
    failed = await checkpoints.save_last(server.store)  # ended without ChatKit's final save
    if failed is not None:
        logger.warning("ChatKit reply checkpoint failed at the end of a stream: %s", failed)


async def _close_quietly(closing: Awaitable[None]) -> None:
    # Closing ChatKit's generator runs respond()'s cleanup; its errors are not ours.
    try:
        await closing
    except Exception:
        logger.debug("closing ChatKit's stream after a failed checkpoint", exc_info=True)
