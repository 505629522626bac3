"""Ids of ``SQLAlchemyStore`` and the rules that keep them from clashing.

* Ids carry 128 random bits behind the SDK's own prefix (the SDK's default
  carries 32: ~1.2 % odds of a clash among 10k threads of one user).
* A thread's creation is an insert that must not meet an existing row of its
  owner, and an item add must not meet an item its thread already has: either
  raises :class:`DuplicateIdError` instead of overwriting or dropping a row.
* A thread made by ``threads.create`` is held (:class:`_NewThread`) and written
  in one transaction with its first item, so a failure in between leaves no
  empty thread behind.

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from functools import cache
from typing import TYPE_CHECKING, Any, TypeVar

from chatkit.store import StoreItemType, default_generate_id
from chatkit.types import ThreadItem, ThreadMetadata

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

ID_RANDOM_BYTES = 16  # 128 random bits per id (the SDK's ids carry 32)
_FRESH_IDS_KEPT = 10_000  # bound of the id bookkeeping below (generated, cancelled)


class DuplicateIdError(Exception):
    """A thread or item was inserted with an id its owner (thread) already has.

    Raised instead of overwriting the existing row or silently dropping the new
    one; the transaction is rolled back, so nothing of the insert is kept.
    """


def _random_hex() -> str:
    return secrets.token_hex(ID_RANDOM_BYTES)


@cache
def _id_prefix(kind: StoreItemType) -> str:
    # The SDK's own prefix for this kind ("thr", "msg", ...), without naming its private table.
    return default_generate_id(kind).rpartition("_")[0]


def _remember(kept: OrderedDict[K, None], key: K) -> None:
    """Add ``key``, forgetting the oldest keys beyond the bound."""
    kept[key] = None
    while len(kept) > _FRESH_IDS_KEPT:
        kept.popitem(last=False)


class _NewThread:
    """A thread being created by ``threads.create``, not written until its first item.

    ChatKit saves the new thread, streams ``thread.created``, and only then adds
    the user message; a database failure or a cancel in between would leave an
    empty thread behind. Held here, the thread and its first item are written
    in one transaction instead.
    """

    def __init__(self) -> None:
        self.armed = True  # the next save_thread in this context is the creation
        self.threads: dict[str, tuple[str, ThreadMetadata]] = {}

    def get(self, owner: str, thread_id: str) -> ThreadMetadata | None:
        entry = self.threads.get(thread_id)
        return entry[1] if entry is not None and entry[0] == owner else None


_new_thread: ContextVar[_NewThread | None] = ContextVar("chatkit_new_thread", default=None)


class StoreIds:
    """Mixed into ``SQLAlchemyStore``: id generation and the duplicate-id rules."""

    if TYPE_CHECKING:

        async def _run(self, fn: Callable[..., T], *args: Any) -> T: ...

        def _add_thread_item(
            self,
            owner: str,
            thread_id: str,
            item: ThreadItem,
            new_thread: ThreadMetadata | None = None,
        ) -> None: ...

    def _init_ids(self) -> None:
        # Thread ids this store generated and has not written yet: their first
        # save_thread is the creation, an insert that must not meet an existing row.
        self._fresh_thread_ids: OrderedDict[str, None] = OrderedDict()
        # (owner, thread, item) of item inserts whose caller was cancelled mid-write.
        self._cancelled_adds: OrderedDict[tuple[str, str, str], None] = OrderedDict()

    @staticmethod
    def defer_new_thread() -> None:
        """Call in the context a ``threads.create`` request runs in (the view does).

        The thread it creates is then written atomically with its first item.
        """
        _new_thread.set(_NewThread())

    def generate_thread_id(self, context: Any) -> str:
        """``thr_`` + 32 hex digits (128 random bits; the SDK's default has 32 bits)."""
        thread_id = f"{_id_prefix('thread')}_{_random_hex()}"
        _remember(self._fresh_thread_ids, thread_id)  # never saved: the oldest are forgotten
        return thread_id

    def generate_item_id(
        self, item_type: StoreItemType, thread: ThreadMetadata, context: Any
    ) -> str:
        """The SDK's prefix for ``item_type`` + 32 hex digits (128 random bits)."""
        return f"{_id_prefix(item_type)}_{_random_hex()}"

    def _is_creation(self, thread_id: str) -> bool:
        """Whether this write of ``thread_id`` creates it (first save of a generated id)."""
        try:
            del self._fresh_thread_ids[thread_id]
        except KeyError:
            return False
        return True

    async def _insert_item(
        self, owner: str, thread_id: str, item: ThreadItem, held: ThreadMetadata | None = None
    ) -> None:
        key = (owner, thread_id, item.id)
        try:
            await self._run(self._add_thread_item, owner, thread_id, item, held)
        except asyncio.CancelledError:
            # The write goes on in its worker thread and may commit, while ChatKit,
            # seeing the cancel, adds the same item again (as a pending one in
            # handle_stream_cancelled). That second add is no clash: remember it.
            _remember(self._cancelled_adds, key)
            raise
        except DuplicateIdError:
            if key not in self._cancelled_adds:
                raise
            del self._cancelled_adds[key]  # the cancelled add got there first: keep it
            return
        self._cancelled_adds.pop(key, None)
