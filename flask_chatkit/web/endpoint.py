"""The ChatKit HTTP endpoint: validate, authenticate, check ownership, then bridge.

Order of checks for ``POST <prefix>``: origin (403, in before_request) →
method (405) → login with the default context (401) → size (413) → content
type (415) → JSON and ChatKit schema (400) → a custom context loader →
ownership of every id the request names (404/409) — all before ChatKit runs, so a stream is
never half-started for a request that was going to fail.
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import AsyncIterable
from typing import Any

from chatkit.server import StreamingResult
from chatkit.store import AttachmentStore, NotFoundError, Store
from chatkit.types import AttachmentsDeleteReq, ChatKitReq, ThreadsCreateReq, is_streaming_req
from flask import Blueprint, Response, g, request
from werkzeug.exceptions import HTTPException

from ..attachments import FileAttachmentStore, is_uploaded, not_uploaded_yet
from ..bridge.loop import Failure
from ..bridge.stream import Plain, Stream
from ..context import new_request_id, require_login
from ..state import ChatKitState, get_state
from .body import ContextKeepingBody
from .errors import (
    ChatKitHTTPException,
    classify_exception,
    error_response,
    http_exception_response,
    method_not_allowed,
)
from .json_limits import check_metadata_size
from .new_thread import hold_until_stored
from .observe import RequestObserver, count_error_response
from .peek import request_body
from .preconditions import check_implemented, check_items_exist, check_sdk_preconditions
from .protocol import (
    clamp_page_limit,
    iter_owned_refs_checks,
    limit_lists,
    owned_refs,
    parse_request,
    process_parsed,
    serialize_request,
)
from .security import apply_cors, check_origin, preflight_response
from .urls import url_rewriter

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
    if clamp_page_limit(parsed, settings.max_page_size) | limit_lists(parsed):
        body = serialize_request(parsed)
    check_metadata_size(parsed.metadata, settings.max_metadata_bytes)
    context = state.context_loader(request, parsed.metadata)
    parsed.metadata = {}  # ChatKit never reads it: only the context keeps its copy
    state.ensure_schema()
    thread_id = getattr(parsed.params, "thread_id", None)
    observer = RequestObserver(state, parsed.type, context, thread_id)
    with observer.active():  # the request's span is current while ChatKit runs
        return run_chatkit_request(state, parsed, body, context, observer)


def run_chatkit_request(
    state: ChatKitState,
    parsed: ChatKitReq,
    body: bytes,
    context: Any,
    observer: RequestObserver,
) -> Response:
    # Flask's app/request contexts and Flask-Login's user live in contextvars:
    # the copy makes them visible inside respond() on the loop thread.
    ctx = contextvars.copy_context()
    defer_new_thread = getattr(state.store, "defer_new_thread", None)
    if isinstance(parsed, ThreadsCreateReq) and callable(defer_new_thread):
        ctx.run(defer_new_thread)  # no empty thread if the first write fails

    check_implemented(state.server, parsed)  # 501 before any store work

    async def start() -> Any:
        await verify_ownership(state.server.store, parsed, context, state.attachment_store)
        await check_sdk_preconditions(state.server.store, parsed, context)
        return await process_parsed(state.server, parsed, body, context)

    # Stored attachment URLs are relative; they become absolute on a trusted base here.
    rewrite = url_rewriter(settings=state.settings)
    if not is_streaming_req(parsed):
        result = state.loop_thread.run(start, ctx)
        if not isinstance(result, StreamingResult):
            observer.responded(200)
            return Response(rewrite(result.json), mimetype="application/json")
        stream = _new_stream(state, parsed, result, ctx, observer)  # an overridden process()
        stream.start()
    else:
        # One task on the loop checks, runs ChatKit and pumps the stream; this
        # greenlet/thread waits once, for the first chunk (or an error, or a
        # plain result from an overridden process()).
        async def prepare() -> AsyncIterable[bytes] | Plain:
            result = await start()
            if not isinstance(result, StreamingResult):
                return Plain(result)
            return _stream_source(parsed, result)

        stream = _new_stream(state, parsed, None, ctx, observer)
        stream.start(prepare)
    first = stream.first()
    if isinstance(first, Failure):  # failed before any byte: still a plain HTTP error
        raise first.exc
    if isinstance(first, Plain):
        observer.responded(200)
        return Response(rewrite(first.value.json), mimetype="application/json")
    observer.stream_started(first)
    return Response(
        ContextKeepingBody(stream, rewrite), mimetype="text/event-stream", headers=SSE_HEADERS
    )


def _stream_source(parsed: ChatKitReq, result: StreamingResult) -> AsyncIterable[bytes]:
    # A new thread's id goes out only once the thread can be read (see new_thread.py).
    return hold_until_stored(result) if isinstance(parsed, ThreadsCreateReq) else result


def _new_stream(
    state: ChatKitState,
    parsed: ChatKitReq,
    result: StreamingResult | None,
    ctx: contextvars.Context,
    observer: RequestObserver,
) -> Stream:
    settings = state.settings
    return Stream(
        state.loop_thread,
        None if result is None else _stream_source(parsed, result),
        ctx,
        heartbeat=settings.heartbeat_seconds,
        cancel_timeout=settings.cancel_timeout,
        on_disconnect=settings.on_disconnect,
        on_end=observer.stream_ended,
        started=observer.started,
    )


async def verify_ownership(
    store: Store[Any],
    parsed: ChatKitReq,
    context: Any,
    attachment_store: AttachmentStore[Any] | None = None,
) -> None:
    """404 for any thread, item or attachment id that is unknown or not the caller's.

    ChatKit alone answers a foreign ``items.list`` with an empty page and a
    foreign ``threads.delete`` with ``{}``; checking here makes both a 404.
    """
    refs = owned_refs(parsed)
    # A user message may only carry attachments whose bytes have arrived.
    must_be_uploaded = not isinstance(parsed, AttachmentsDeleteReq)
    for kind, ref_id in iter_owned_refs_checks(refs):
        try:
            if kind == "thread":
                await store.load_thread(ref_id, context=context)
            else:
                attachment = await store.load_attachment(ref_id, context=context)
                if not must_be_uploaded:
                    continue
                if isinstance(attachment_store, FileAttachmentStore):
                    await attachment_store.confirm_uploaded(attachment, context)
                elif not is_uploaded(attachment):
                    raise not_uploaded_yet(ref_id)
        except NotFoundError:
            raise ChatKitHTTPException(404, f"{kind.capitalize()} {ref_id} not found.") from None
        if kind == "thread" and ref_id == refs.thread_id and refs.item_ids:
            await check_items_exist(store, ref_id, refs.item_ids, context)
