"""Every check that runs before ChatKit, so a request that was going to fail never starts.

ChatKit answers some mistakes in ways a client cannot act on: a foreign
``items.list`` is an empty page, a foreign ``threads.delete`` is ``{}``, a
``NotFoundError`` in a streaming request surfaces only after the SSE response has
started, and a client's mistake (a tool output with no pending call, a retry after an
assistant item, an action on a non-widget item) is a bare ``ValueError`` (a 500 with a
traceback, or mid-stream). An operation the app did not implement is a
``NotImplementedError`` from the SDK's default method. So, in this order:

1. :func:`check_request` — what the parsed request alone decides: page limits
   (400 or clamped), list sizes (400), ``metadata`` size (413); then, once the
   context is loaded, :func:`check_implemented` — an operation the server does not
   implement (501).
2. :func:`check_against_store` — what the store decides, through the owner-scoped
   store: every thread, item and attachment id the request names is the caller's
   (404; 409 for an attachment whose bytes have not arrived), and the SDK's own
   preconditions hold (400 ``invalid_request``). These mirror the SDK's checks,
   nothing broader; the SDK still runs its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core
from chatkit.server import ChatKitServer
from chatkit.store import AttachmentStore, NotFoundError, Store
from chatkit.types import (
    AttachmentsDeleteReq,
    ChatKitReq,
    ClientToolCallItem,
    InputTranscribeReq,
    ItemsFeedbackReq,
    ItemsListReq,
    StructuredInputItem,
    ThreadItem,
    ThreadsAddClientToolOutputReq,
    ThreadsAddStructuredInputReq,
    ThreadsCustomActionReq,
    ThreadsListReq,
    ThreadsRetryAfterItemReq,
    ThreadsSyncCustomActionReq,
    UserMessageInput,
    UserMessageItem,
    WidgetItem,
)

from ..attachments import FileAttachmentStore, is_uploaded, not_uploaded_yet
from ..config import Settings
from ..errors import ChatKitHTTPException, bad_request

# Most item ids one request may name (items.feedback, after removing repeats)
# and most attachments one message may carry: each is a store lookup.
MAX_ITEM_IDS = 100
# Most content parts in one user message (each becomes a model, stored and streamed back).
MAX_CONTENT_PARTS = 100


def check_request(request: ChatKitReq, settings: Settings) -> bool:
    """The checks the parsed request alone decides; True when one changed it in place
    (a page limit clamped, repeated ids dropped)."""
    changed = clamp_page_limit(request, settings.max_page_size) | limit_lists(request)
    check_metadata_size(request.metadata, settings.max_metadata_bytes)
    return changed


async def check_against_store(
    store: Store[Any],
    request: ChatKitReq,
    context: Any,
    attachment_store: AttachmentStore[Any] | None,
) -> None:
    """The checks the store decides: ownership of every id, then the SDK's preconditions."""
    await verify_ownership(store, request, context, attachment_store)
    await check_sdk_preconditions(store, request, context)


def check_metadata_size(metadata: dict[str, Any], limit: int) -> None:
    """413 when the request's ``metadata``, serialized, exceeds ``limit`` bytes."""
    if not metadata:
        return
    size = len(pydantic_core.to_json(metadata))
    if size > limit:
        raise ChatKitHTTPException(
            413, f"Request metadata is {size} bytes serialized; at most {limit} are allowed."
        )


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


# Requests served by a ChatKitServer method whose default raises NotImplementedError.
_OPTIONAL_METHODS: tuple[tuple[type[Any], str], ...] = (
    (InputTranscribeReq, "transcribe"),
    (ThreadsSyncCustomActionReq, "sync_action"),
    (ThreadsCustomActionReq, "action"),
)


def check_implemented(server: ChatKitServer[Any], request: ChatKitReq) -> None:
    """501 when the request needs a method the server class left at the SDK default."""
    for request_type, method in _OPTIONAL_METHODS:
        default = getattr(ChatKitServer, method)
        if isinstance(request, request_type) and getattr(type(server), method, None) is default:
            raise ChatKitHTTPException(
                501,
                f"This server does not implement {request.type} "
                f"({type(server).__name__}.{method} is not defined).",
                "not_implemented",
            )


def invalid(message: str) -> ChatKitHTTPException:
    return bad_request(message, "invalid_request")


async def check_items_exist(
    store: Store[Any], thread_id: str, item_ids: Sequence[str], context: Any
) -> None:
    """404 for the first id that is not an item of the caller's thread.

    A store with ``owned_item_ids`` (``SQLAlchemyStore``) answers in one query;
    any other store is asked per id (the view caps how many ids a request names).
    """
    if not item_ids:
        return
    owned_item_ids = getattr(store, "owned_item_ids", None)
    if callable(owned_item_ids):
        found: set[str] = await owned_item_ids(thread_id, item_ids, context)
        missing = [item_id for item_id in item_ids if item_id not in found]
        if missing:
            raise ChatKitHTTPException(404, f"Item {missing[0]} not found.")
        return
    for item_id in item_ids:
        try:
            await store.load_item(thread_id, item_id, context=context)
        except NotFoundError:
            raise ChatKitHTTPException(404, f"Item {item_id} not found.") from None


async def check_sdk_preconditions(store: Store[Any], request: ChatKitReq, context: Any) -> None:
    """400 for the requests ChatKit would fail with a ValueError (ids already owned)."""
    if isinstance(request, ThreadsAddClientToolOutputReq):
        thread_id = request.params.thread_id
        # The SDK looks at the newest item only.
        last = await store.load_thread_items(thread_id, None, 1, "desc", context)
        if not any(
            isinstance(item, ClientToolCallItem) and item.status == "pending" for item in last.data
        ):
            raise invalid(f"Thread {thread_id} has no pending client tool call.")
    elif isinstance(request, ThreadsRetryAfterItemReq):
        item = await _load(store, request.params.thread_id, request.params.item_id, context)
        if not isinstance(item, UserMessageItem):
            raise invalid(f"Item {item.id} is not a user message; retry after a user message.")
    elif isinstance(request, ThreadsSyncCustomActionReq | ThreadsCustomActionReq):
        if request.params.item_id:
            item = await _load(store, request.params.thread_id, request.params.item_id, context)
            if not isinstance(item, WidgetItem):
                raise invalid(f"Item {item.id} is not a widget; actions need a widget sender.")
    elif isinstance(request, ThreadsAddStructuredInputReq):
        item = await _load(store, request.params.thread_id, request.params.item_id, context)
        if not isinstance(item, StructuredInputItem):
            raise invalid(f"Item {item.id} is not a structured input item.")
        if item.status != "pending":
            raise invalid(f"Structured input item {item.id} is not pending.")


async def _load(store: Store[Any], thread_id: str, item_id: str, context: Any) -> ThreadItem:
    try:
        return await store.load_item(thread_id, item_id, context=context)
    except NotFoundError:
        raise ChatKitHTTPException(404, f"Item {item_id} not found.") from None
