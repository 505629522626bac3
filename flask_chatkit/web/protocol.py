"""Parsing ChatKit requests once, and running them without parsing twice.

``ChatKitServer.process()`` builds ``TypeAdapter(ChatKitReq)`` on *every* call
(~2.5 ms, most of a ``threads.list``). The view must parse the request anyway
(ownership checks, limit clamping), so it parses once with a cached adapter
and, when the server uses the SDK's own ``process()``, dispatches the parsed
request straight to the SDK's handlers. Anything unexpected (an overridden
``process``, an SDK whose internals moved) falls back to ``process()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from chatkit.logger import logger as sdk_logger
from chatkit.server import ChatKitServer, NonStreamingResult, StreamingResult
from chatkit.types import (
    ChatKitReq,
    ItemsFeedbackReq,
    ItemsListReq,
    ThreadsListReq,
    UserMessageInput,
    is_streaming_req,
)
from chatkit.version import __version__ as sdk_version
from pydantic import TypeAdapter, ValidationError

from .errors import bad_request
from .json_limits import check_json_shape

logger = logging.getLogger("flask_chatkit")

REQUEST_ADAPTER: TypeAdapter[ChatKitReq] = TypeAdapter(ChatKitReq)

# Most item ids one request may name (items.feedback, after removing repeats)
# and most attachments one message may carry: each is a store lookup.
MAX_ITEM_IDS = 100
# Most content parts in one user message (each becomes a model, stored and streamed back).
MAX_CONTENT_PARTS = 100

# The SDK internals the fast path calls; checked once per server class.
_FAST_PATH_HOOKS = ("_process_streaming", "_process_non_streaming")
# Every global and attribute the SDK's own process() touched when the fast path
# was written (openai-chatkit 1.x). If an SDK release changes process(), this
# set changes and we fall back to calling process() itself: slower, never wrong.
_KNOWN_PROCESS_NAMES = frozenset(
    {
        "NonStreamingResult", "StreamingResult", "TypeAdapter", "ChatKitReq",
        "validate_json", "logger", "info", "type", "is_streaming_req",
        "_process_streaming", "_process_non_streaming",
    }
)  # fmt: skip


def _sdk_process_unchanged() -> bool:
    return (
        sdk_version.split(".")[0] == "1"
        and frozenset(ChatKitServer.process.__code__.co_names) == _KNOWN_PROCESS_NAMES
    )


FAST_PATH_AVAILABLE = _sdk_process_unchanged()


def parse_request(body: bytes) -> ChatKitReq:
    """Validate a raw body into a ChatKit request, or raise a 400 with a useful message.

    A body that would parse into too many values is a 413 before it is parsed.
    """
    check_json_shape(body)
    try:
        return REQUEST_ADAPTER.validate_json(body)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc), "invalid_request") from None
    except RecursionError:
        raise bad_request("Request JSON is nested too deeply.", "invalid_request") from None


def describe_validation_error(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    if any(e["type"] == "json_invalid" for e in errors):
        return "Malformed JSON body."
    if any(e["type"] in ("union_tag_invalid", "union_tag_not_found") for e in errors):
        return "Unknown or missing ChatKit request 'type'."
    parts = []
    for error in errors[:3]:
        location = ".".join(str(p) for p in error["loc"][1:]) or "body"
        parts.append(f"{location}: {error['msg']}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "Invalid ChatKit request: " + "; ".join(parts) + more


def clamp_page_limit(request: ChatKitReq, max_page_size: int) -> bool:
    """Reject non-positive page limits; clamp large ones. True when changed."""
    if not isinstance(request, ThreadsListReq | ItemsListReq):
        return False
    limit = request.params.limit
    if limit is None:
        return False
    if limit < 1:
        raise bad_request("'limit' must be a positive integer.", "invalid_request")
    if limit > max_page_size:
        request.params.limit = max_page_size
        return True
    return False


def limit_lists(request: ChatKitReq) -> bool:
    """Bound the lists a request may name; True when the request was changed.

    ``items.feedback`` ids lose their repeats (first kept) and, like a message's
    attachments, are capped at ``MAX_ITEM_IDS``: each one is checked against the
    store before ChatKit runs. A message's content parts are capped at
    ``MAX_CONTENT_PARTS``. Past a cap: 400.
    """
    params: Any = getattr(request, "params", None)
    user_input = getattr(params, "input", None)
    if isinstance(user_input, UserMessageInput):
        _check_count("input.content", len(user_input.content), MAX_CONTENT_PARTS)
        _check_count("input.attachments", len(user_input.attachments), MAX_ITEM_IDS)
    if not isinstance(request, ItemsFeedbackReq):
        return False
    ids = request.params.item_ids
    unique = list(dict.fromkeys(ids))
    _check_count("item_ids", len(unique), MAX_ITEM_IDS)
    if len(unique) == len(ids):
        return False
    request.params.item_ids = unique
    return True


def _check_count(field: str, count: int, limit: int) -> None:
    if count > limit:
        raise bad_request(
            f"'{field}' names {count} entries; at most {limit} are allowed.", "invalid_request"
        )


@dataclass(frozen=True)
class OwnedRefs:
    """Ids a request names that must belong to the caller before ChatKit runs."""

    thread_id: str | None
    item_ids: tuple[str, ...]
    attachment_ids: tuple[str, ...]
    thread_after: str | None  # a threads.list cursor (a thread id)


def owned_refs(request: ChatKitReq) -> OwnedRefs:
    params: Any = getattr(request, "params", None)
    thread_id = getattr(params, "thread_id", None)
    item_ids: list[str] = []
    for name in ("item_id", "after"):
        value = getattr(params, name, None)
        if isinstance(value, str) and value and thread_id is not None:
            item_ids.append(value)
    item_ids.extend(getattr(params, "item_ids", None) or [])
    attachment_ids: list[str] = []
    user_input = getattr(params, "input", None)
    if isinstance(user_input, UserMessageInput):
        attachment_ids.extend(user_input.attachments)
    if isinstance(getattr(params, "attachment_id", None), str):
        attachment_ids.append(params.attachment_id)
    thread_after = params.after if isinstance(request, ThreadsListReq) else None
    return OwnedRefs(thread_id, tuple(item_ids), tuple(attachment_ids), thread_after or None)


def iter_owned_refs_checks(refs: OwnedRefs) -> Iterator[tuple[str, str]]:
    """(kind, id) pairs of threads and attachments, in the order the view verifies them.

    Item ids are checked together, in one store call (``check_items_exist``).
    """
    if refs.thread_id:
        yield "thread", refs.thread_id
    if refs.thread_after:
        yield "thread", refs.thread_after
    for attachment_id in refs.attachment_ids:
        yield "attachment", attachment_id


def _sdk_process_is_stock(server: ChatKitServer[Any]) -> bool:
    cls = type(server)
    return (
        FAST_PATH_AVAILABLE
        and cls.process is ChatKitServer.process
        and all(callable(getattr(cls, hook, None)) for hook in _FAST_PATH_HOOKS)
    )


async def process_parsed(
    server: ChatKitServer[Any], request: ChatKitReq, raw_body: bytes, context: Any
) -> StreamingResult | NonStreamingResult:
    """Equivalent of ``server.process(raw_body, context)`` for an already parsed request."""
    if not _sdk_process_is_stock(server):
        return await server.process(raw_body, context)
    sdk_logger.info(f"Received request op: {request.type}")
    if is_streaming_req(request):
        return StreamingResult(server._process_streaming(request, context))
    return NonStreamingResult(await server._process_non_streaming(request, context))


def serialize_request(request: ChatKitReq) -> bytes:
    return REQUEST_ADAPTER.dump_json(request, by_alias=True)
