"""``SQLAlchemyStore``: a ``chatkit.store.Store`` on SQLite or PostgreSQL.

Imports nothing of Flask (a FastAPI or Django ChatKit host can use it as is).
Every read and write is scoped by the owner key ``owner(context)``. The async
methods run their blocking SQLAlchemy work on native OS threads (see
:mod:`flask_chatkit.bridge.native`) so a database round trip never blocks the loop.
Ids and their clash rules live in :mod:`.ids`, schema and CLI work in
:mod:`.maintenance`, the attachments table in :mod:`.attachment_rows`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from chatkit.store import NotFoundError, Store
from chatkit.types import Attachment, Page, SDKHiddenContextItem, ThreadItem, ThreadMetadata
from sqlalchemy import Connection, Engine, Table, and_, delete, select
from sqlalchemy.engine import URL

from ..bridge.native import NativeThreadPool, native_lock
from .attachment_rows import AttachmentRows
from .ids import DuplicateIdError, StoreIds, _new_thread
from .maintenance import Maintenance
from .payloads import attachment_adapter, item_adapter, thread_payload
from .schema import (
    build_engine,
    build_tables,
    db_time,
    engine_pool_capacity,
    insert_new,
    is_sqlite_memory,
    keyset_page,
    upsert,
)

__all__ = ["DuplicateIdError", "SQLAlchemyStore", "default_owner"]

T = TypeVar("T")
_CHUNK = 500
DEFAULT_MAX_PAGE_BYTES = 4 * 1024 * 1024


def default_owner(context: Any) -> str:
    """The default owner key: ``context.user_id``."""
    key: str = getattr(context, "user_id")  # noqa: B009 - any context with a user_id
    return key


class SQLAlchemyStore(StoreIds, Maintenance, AttachmentRows, Store[Any]):
    """ChatKit store over SQLAlchemy (SQLite or PostgreSQL), owner-scoped.

    ``bind`` is a database URL or an existing :class:`~sqlalchemy.Engine`
    (e.g. Flask-SQLAlchemy's ``db.engine``).
    """

    def __init__(
        self,
        bind: str | URL | Engine,
        *,
        owner: Callable[[Any], str] = default_owner,
        table_prefix: str = "chatkit_",
        pool_size: int | None = None,
        max_page_bytes: int | None = DEFAULT_MAX_PAGE_BYTES,
    ) -> None:
        if isinstance(bind, Engine):
            self.engine = bind
        else:
            self.engine = build_engine(bind, pool_size=pool_size)
        self._owner = owner
        # A page of items also ends once its payloads reach this many bytes (None: no bound).
        self.max_page_bytes = max_page_bytes
        # Called (sync, after commit) with the ids of attachment rows removed along
        # with their threads, so their files can go too; the extension wires it.
        self.on_attachments_deleted: Callable[[list[str]], None] | None = None
        self.table_prefix = table_prefix
        tables = build_tables(table_prefix)
        self.metadata = tables.metadata
        self.threads = tables.threads
        self.items = tables.items
        self.attachments = tables.attachments
        self.schema_version_table = tables.schema_version
        self.dialect = self.engine.dialect.name
        self._init_ids()
        self._sqlite = self.dialect == "sqlite"
        self._memory = self._sqlite and is_sqlite_memory(self.engine.url)
        self._start_workers()

    def _start_workers(self) -> None:
        self._pid = os.getpid()
        # A single shared in-memory connection must never be used by two threads at once.
        self._guard: Any = native_lock() if self._memory else contextlib.nullcontext()
        workers = 1 if self._memory else engine_pool_capacity(self.engine)
        self._pool: NativeThreadPool = NativeThreadPool(max_workers=workers, name="chatkit-store")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking database work on a worker thread (never on the event loop)."""
        if self._pid != os.getpid():  # forked (e.g. gunicorn): the workers stayed behind
            self.engine.dispose(close=False)  # the parent's connections are not ours
            self._start_workers()
        return await self._pool.run(fn, *args)

    # -- plumbing -------------------------------------------------------------
    def owner_key(self, context: Any) -> str:
        key = self._owner(context)
        if not isinstance(key, str) or not key:
            raise ValueError(f"owner key must be a non-empty string, got {key!r}")
        return key

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[Connection]:
        """One transaction; on SQLite a write takes the write lock up front."""
        with self._guard, self.engine.begin() as conn:
            if self._sqlite:
                dbapi = conn.connection.dbapi_connection
                if dbapi is not None and not dbapi.in_transaction:
                    conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
            yield conn

    async def ping(self) -> None:
        """``SELECT 1`` on a pooled connection (the health route's database check)."""
        await self._run(self._ping)

    def close(self) -> None:
        """Stop the worker threads (the engine stays usable if it was passed in)."""
        self._pool.shutdown()

    # -- sync implementations (run on the pool) ------------------------------
    def _ping(self) -> None:
        with self._tx() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _payload(self, table: Table, not_found: str, *where: Any) -> Any:
        """The payload of the one row of ``table`` matching ``where`` (NotFoundError if none)."""
        with self._tx() as conn:
            payload = conn.execute(select(table.c.payload).where(*where)).scalar()
        if payload is None:
            raise NotFoundError(not_found)
        return payload

    def _load_thread(self, owner: str, thread_id: str) -> ThreadMetadata:
        t = self.threads
        payload = self._payload(
            t, f"Thread {thread_id} not found", t.c.owner == owner, t.c.id == thread_id
        )
        return ThreadMetadata.model_validate(payload)

    @staticmethod
    def _thread_values(owner: str, thread: ThreadMetadata) -> dict[str, Any]:
        return {
            "owner": owner,
            "id": thread.id,
            "created_at": db_time(thread.created_at),
            "payload": thread_payload(thread),
        }

    def _save_thread(self, owner: str, thread: ThreadMetadata, create: bool = False) -> None:
        with self._tx(write=True) as conn:
            if create:
                self._insert_thread(conn, owner, thread)
            else:
                upsert(conn, self.threads, ("owner", "id"), self._thread_values(owner, thread))

    def _insert_thread(self, conn: Connection, owner: str, thread: ThreadMetadata) -> None:
        # A new thread never takes over an existing one of its owner (its title, its
        # items). Another owner's thread with the same id is another row, untouched.
        if not insert_new(conn, self.threads, ("owner", "id"), self._thread_values(owner, thread)):
            raise DuplicateIdError(f"Thread {thread.id} already exists")

    def _load_threads(
        self, owner: str, limit: int, after: str | None, order: str
    ) -> Page[ThreadMetadata]:
        t = self.threads
        with self._tx() as conn:
            rows, more = keyset_page(conn, t, t.c.owner == owner, after, limit, order, "Thread")
        data = [ThreadMetadata.model_validate(r.payload) for r in rows]
        return Page(data=data, has_more=more, after=rows[-1].id if more and rows else None)

    def _load_thread_items(
        self, owner: str, thread_id: str, after: str | None, limit: int, order: str
    ) -> Page[ThreadItem]:
        i = self.items
        scope = and_(i.c.thread_id == thread_id, i.c.owner == owner)
        with self._tx() as conn:
            rows, more = keyset_page(
                conn, i, scope, after, limit, order, "Item", self.max_page_bytes
            )
        adapter = item_adapter()
        data = [adapter.validate_python(r.payload) for r in rows]
        return Page(data=data, has_more=more, after=rows[-1].id if more and rows else None)

    def _item_values(self, owner: str, thread_id: str, item: ThreadItem) -> dict[str, Any]:
        return {
            "owner": owner,
            "thread_id": thread_id,
            "id": item.id,
            "created_at": db_time(item.created_at),
            "payload": item.model_dump(mode="json"),
        }

    def _add_thread_item(
        self, owner: str, thread_id: str, item: ThreadItem, new_thread: ThreadMetadata | None = None
    ) -> None:
        values = self._item_values(owner, thread_id, item)
        with self._tx(write=True) as conn:
            if new_thread is not None:
                self._insert_thread(conn, owner, new_thread)
            # Never an overwrite, never a silent drop: the SDK only adds new items,
            # so an id the thread already holds is a clash. Items of other threads
            # and owners with the same id are other rows, untouched.
            if not insert_new(conn, self.items, ("owner", "thread_id", "id"), values):
                raise DuplicateIdError(f"Item {item.id} already exists in thread {thread_id}")

    def _save_item(self, owner: str, thread_id: str, item: ThreadItem) -> None:
        values = self._item_values(owner, thread_id, item)
        with self._tx(write=True) as conn:
            upsert(conn, self.items, ("owner", "thread_id", "id"), values)

    def _load_item(self, owner: str, thread_id: str, item_id: str) -> ThreadItem:
        i = self.items
        scope = (i.c.owner == owner, i.c.thread_id == thread_id, i.c.id == item_id)
        payload = self._payload(i, f"Item {item_id} not found", *scope)
        return item_adapter().validate_python(payload)

    def _owned_item_ids(self, owner: str, thread_id: str, item_ids: Sequence[str]) -> set[str]:
        i = self.items
        found: set[str] = set()
        with self._tx() as conn:
            for start in range(0, len(item_ids), _CHUNK):
                chunk = item_ids[start : start + _CHUNK]
                found.update(
                    conn.execute(
                        select(i.c.id).where(
                            i.c.owner == owner, i.c.thread_id == thread_id, i.c.id.in_(chunk)
                        )
                    ).scalars()
                )
        return found

    def _delete_thread_item(self, owner: str, thread_id: str, item_id: str) -> None:
        i = self.items
        with self._tx(write=True) as conn:
            conn.execute(
                delete(i).where(i.c.owner == owner, i.c.thread_id == thread_id, i.c.id == item_id)
            )

    def _delete_threads(self, conn: Connection, owner: str, ids: Sequence[str]) -> list[str]:
        """Delete threads with their items and attachment rows; returns the attachment ids."""
        a = self.attachments
        attachment_ids: list[str] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            attachment_ids += conn.execute(
                select(a.c.id).where(a.c.owner == owner, a.c.thread_id.in_(chunk))
            ).scalars()
            for table, col in (
                (self.items, self.items.c.thread_id),
                (self.attachments, self.attachments.c.thread_id),
                (self.threads, self.threads.c.id),
            ):
                conn.execute(delete(table).where(table.c.owner == owner, col.in_(chunk)))
        return attachment_ids

    def _attachments_removed(self, attachment_ids: list[str]) -> None:
        # After commit: the files go only once no row points at them any more.
        if attachment_ids and self.on_attachments_deleted is not None:
            self.on_attachments_deleted(attachment_ids)

    def _delete_thread(self, owner: str, thread_id: str) -> None:
        with self._tx(write=True) as conn:
            removed = self._delete_threads(conn, owner, [thread_id])
        self._attachments_removed(removed)

    def _load_attachment(self, owner: str, attachment_id: str) -> Attachment:
        a = self.attachments
        payload = self._payload(
            a, f"Attachment {attachment_id} not found", a.c.owner == owner, a.c.id == attachment_id
        )
        return attachment_adapter().validate_python(payload)

    def _delete_attachment(self, owner: str, attachment_id: str) -> None:
        a = self.attachments
        with self._tx(write=True) as conn:
            conn.execute(delete(a).where(a.c.owner == owner, a.c.id == attachment_id))

    # -- chatkit.store.Store ---------------------------------------------------
    async def load_thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        owner = self.owner_key(context)
        pending = _new_thread.get()
        if pending is not None and (held := pending.get(owner, thread_id)) is not None:
            return held.model_copy(deep=True)
        return await self._run(self._load_thread, owner, thread_id)

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        owner = self.owner_key(context)
        pending = _new_thread.get()
        if pending is not None and (pending.armed or pending.get(owner, thread.id)):
            # Held until its first item. No database round trip here: the view holds
            # thread.created until that write, so an outage still fails the request
            # with a plain HTTP error before any byte of the stream is sent.
            pending.armed = False
            self._is_creation(thread.id)  # written by an insert with its first item
            pending.threads[thread.id] = (owner, thread.model_copy(deep=True))
            return
        await self._run(self._save_thread, owner, thread, self._is_creation(thread.id))

    async def load_thread_items(
        self, thread_id: str, after: str | None, limit: int, order: str, context: Any
    ) -> Page[ThreadItem]:
        owner = self.owner_key(context)
        return await self._run(self._load_thread_items, owner, thread_id, after, limit, order)

    async def save_attachment(self, attachment: Attachment, context: Any) -> None:
        await self._run(self._save_attachment, self.owner_key(context), attachment)

    async def load_attachment(self, attachment_id: str, context: Any) -> Attachment:
        return await self._run(self._load_attachment, self.owner_key(context), attachment_id)

    async def delete_attachment(self, attachment_id: str, context: Any) -> None:
        await self._run(self._delete_attachment, self.owner_key(context), attachment_id)

    async def load_threads(
        self, limit: int, after: str | None, order: str, context: Any
    ) -> Page[ThreadMetadata]:
        owner = self.owner_key(context)
        return await self._run(self._load_threads, owner, limit, after, order)

    async def add_thread_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        owner = self.owner_key(context)
        pending = _new_thread.get()
        held = pending.get(owner, thread_id) if pending is not None else None
        if pending is None or held is None:
            await self._insert_item(owner, thread_id, item)
            return
        if isinstance(item, SDKHiddenContextItem):
            return  # cancelled before the user message: the empty thread is never written
        await self._insert_item(owner, thread_id, item, held)
        pending.threads.pop(thread_id, None)

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        pending = _new_thread.get()
        if pending is not None and pending.get(self.owner_key(context), thread_id) is not None:
            await self.add_thread_item(thread_id, item, context)
            return
        await self._run(self._save_item, self.owner_key(context), thread_id, item)

    async def load_item(self, thread_id: str, item_id: str, context: Any) -> ThreadItem:
        owner = self.owner_key(context)
        return await self._run(self._load_item, owner, thread_id, item_id)

    async def owned_item_ids(
        self, thread_id: str, item_ids: Sequence[str], context: Any
    ) -> set[str]:
        """Which of ``item_ids`` are items of the caller's thread: one query per 500 ids.

        Not part of chatkit's Store; the Flask view uses it to check the ids of
        a request (e.g. ``items.feedback``) at once instead of one by one.
        """
        owner = self.owner_key(context)
        return await self._run(self._owned_item_ids, owner, thread_id, list(item_ids))

    async def delete_thread(self, thread_id: str, context: Any) -> None:
        pending = _new_thread.get()
        if pending is not None:
            pending.threads.pop(thread_id, None)
        await self._run(self._delete_thread, self.owner_key(context), thread_id)

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Any) -> None:
        owner = self.owner_key(context)
        await self._run(self._delete_thread_item, owner, thread_id, item_id)
