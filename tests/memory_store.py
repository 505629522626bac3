"""A small owner-scoped in-memory chatkit Store for core tests (no database).

It follows the SDK's Store semantics; ``delay`` makes every call really await,
like a store doing network I/O.
"""

from __future__ import annotations

import asyncio
from typing import Any

from chatkit.store import NotFoundError, Store
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata


def owner_of(context: Any) -> str:
    return str(context.user_id)


class MemoryStore(Store[Any]):
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.threads: dict[str, tuple[str, ThreadMetadata]] = {}
        self.items: dict[str, list[ThreadItem]] = {}
        self.attachments: dict[str, tuple[str, Attachment]] = {}

    async def _io(self) -> None:
        await asyncio.sleep(self.delay)

    def _thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        entry = self.threads.get(thread_id)
        if entry is None or entry[0] != owner_of(context):
            raise NotFoundError(f"Thread {thread_id} not found")
        return entry[1]

    async def load_thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        await self._io()
        return self._thread(thread_id, context).model_copy(deep=True)

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        await self._io()
        entry = self.threads.get(thread.id)
        if entry is not None and entry[0] != owner_of(context):
            raise NotFoundError(f"Thread {thread.id} not found")
        self.threads[thread.id] = (owner_of(context), thread.model_copy(deep=True))
        self.items.setdefault(thread.id, [])

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: Any
    ) -> Page[ThreadMetadata]:
        await self._io()
        mine = [t for o, t in self.threads.values() if o == owner_of(context)]
        mine.sort(key=lambda t: t.created_at, reverse=order == "desc")
        return _page(mine, after, limit)

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: Any
    ) -> Page[ThreadItem]:
        await self._io()
        try:
            self._thread(thread_id, context)
        except NotFoundError:
            return Page(data=[], has_more=False)
        items = sorted(self.items[thread_id], key=lambda i: i.created_at, reverse=order == "desc")
        return _page(items, after, limit)

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self._io()
        self._thread(thread_id, context)
        if all(i.id != item.id for i in self.items[thread_id]):
            self.items[thread_id].append(item.model_copy(deep=True))

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self._io()
        self._thread(thread_id, context)
        items = self.items[thread_id]
        for index, existing in enumerate(items):
            if existing.id == item.id:
                items[index] = item.model_copy(deep=True)
                return
        items.append(item.model_copy(deep=True))

    async def load_item(self, thread_id: str, item_id: str, context: Any) -> ThreadItem:
        await self._io()
        self._thread(thread_id, context)
        for item in self.items[thread_id]:
            if item.id == item_id:
                return item.model_copy(deep=True)
        raise NotFoundError(f"Item {item_id} not found")

    async def delete_thread(self, thread_id: str, context: Any) -> None:
        await self._io()
        self._thread(thread_id, context)
        del self.threads[thread_id]
        del self.items[thread_id]

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Any) -> None:
        await self._io()
        self._thread(thread_id, context)
        self.items[thread_id] = [i for i in self.items[thread_id] if i.id != item_id]

    async def save_attachment(self, attachment: Attachment, context: Any) -> None:
        await self._io()
        self.attachments[attachment.id] = (owner_of(context), attachment.model_copy(deep=True))

    async def load_attachment(self, attachment_id: str, context: Any) -> Attachment:
        await self._io()
        entry = self.attachments.get(attachment_id)
        if entry is None or entry[0] != owner_of(context):
            raise NotFoundError(f"Attachment {attachment_id} not found")
        return entry[1]

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        await self._io()
        entry = self.attachments.get(attachment_id)
        if entry is not None and entry[0] == owner_of(context):
            del self.attachments[attachment_id]


def _page(rows: list[Any], after: str | None, limit: int) -> Page[Any]:
    start = 0
    if after is not None:
        ids = [r.id for r in rows]
        if after not in ids:
            raise NotFoundError(f"Cursor {after} not found")
        start = ids.index(after) + 1
    window = rows[start : start + limit]
    has_more = start + limit < len(rows)
    return Page(
        data=window, has_more=has_more, after=window[-1].id if has_more and window else None
    )
