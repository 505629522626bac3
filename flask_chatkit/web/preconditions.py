"""What the SDK would refuse, refused before it runs.

``ChatKitServer`` reports a client's mistake (a tool output with no pending
tool call, a retry after an assistant item, an action on a non-widget item) as
a bare ``ValueError``, and an operation the app did not implement as
``NotImplementedError`` from its default method; both surface as a 500 with a
traceback, or mid-stream. Checking the same conditions here turns them into a
400 ``invalid_request`` or a 501 ``not_implemented`` before any byte is sent.
The SDK still runs its own checks; these mirror them, nothing broader.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatkit.server import ChatKitServer
from chatkit.store import NotFoundError, Store
from chatkit.types import (
    ChatKitReq,
    ClientToolCallItem,
    InputTranscribeReq,
    StructuredInputItem,
    ThreadItem,
    ThreadsAddClientToolOutputReq,
    ThreadsAddStructuredInputReq,
    ThreadsCustomActionReq,
    ThreadsRetryAfterItemReq,
    ThreadsSyncCustomActionReq,
    UserMessageItem,
    WidgetItem,
)

from .errors import ChatKitHTTPException, bad_request

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
