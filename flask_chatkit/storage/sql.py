"""``SQLAlchemyStore``: a ``chatkit.store.Store`` on SQLite or PostgreSQL.

Imports nothing of Flask (a FastAPI or Django ChatKit host can use it as is).
Every read and write is scoped by the owner key ``owner(context)``. The async
methods run their blocking SQLAlchemy work on native OS threads (see
:mod:`flask_chatkit.bridge.native`) so a database round trip never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cache, lru_cache
from typing import Any, TypeVar

from chatkit.store import NotFoundError, Store, StoreItemType, default_generate_id
from chatkit.types import Attachment, Page, SDKHiddenContextItem, ThreadItem, ThreadMetadata
from pydantic import TypeAdapter
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    delete,
    exists,
    inspect,
    select,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from ..bridge.native import NativeThreadPool, native_lock
from .attachment_rows import AttachmentRows
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
from .version import check as check_version
from .version import read_version, record_version

__all__ = ["DuplicateIdError", "SQLAlchemyStore", "default_owner"]

T = TypeVar("T")
_THREAD_FIELDS = frozenset(ThreadMetadata.model_fields)
_CHUNK = 500
DEFAULT_MAX_PAGE_BYTES = 4 * 1024 * 1024
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


@lru_cache(maxsize=1)
def _item_adapter() -> TypeAdapter[ThreadItem]:
    return TypeAdapter(ThreadItem)


@lru_cache(maxsize=1)
def _attachment_adapter() -> TypeAdapter[Attachment]:
    return TypeAdapter(Attachment)


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


def default_owner(context: Any) -> str:
    """The default owner key: ``context.user_id``."""
    key: str = getattr(context, "user_id")  # noqa: B009 - any context with a user_id
    return key


def _thread_payload(thread: ThreadMetadata) -> dict[str, Any]:
    return thread.model_dump(mode="json", include=set(_THREAD_FIELDS))


class SQLAlchemyStore(AttachmentRows, Store[Any]):
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
        # Thread ids this store generated and has not written yet: their first
        # save_thread is the creation, an insert that must not meet an existing row.
        self._fresh_thread_ids: OrderedDict[str, None] = OrderedDict()
        # (owner, thread, item) of item inserts whose caller was cancelled mid-write.
        self._cancelled_adds: OrderedDict[tuple[str, str, str], None] = OrderedDict()
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

    @staticmethod
    def defer_new_thread() -> None:
        """Call in the context a ``threads.create`` request runs in (the view does).

        The thread it creates is then written atomically with its first item.
        """
        _new_thread.set(_NewThread())

    def create_all(self) -> None:
        """Create the missing tables and record the schema version (idempotent).

        Raises :class:`~flask_chatkit.storage.version.SchemaOutdated` when existing
        tables are older than this code (e.g. a missing column): that needs a migration.
        """
        try:
            self._create_all()
        except DBAPIError:  # another process created them between check and CREATE
            self._create_all()

    def _create_all(self) -> None:
        with self._tx(write=True) as conn:
            self.metadata.create_all(conn, checkfirst=True)
            self._add_attachment_columns(conn)  # schema 2: nullable, a plain ADD COLUMN
            # Creating tables cannot add other columns: check before recording the version.
            version_table, where = self.schema_version_table, self._where()
            check_version(conn, self.metadata, version_table, where, structure_only=True)
            record_version(conn, version_table)

    def check_schema(self) -> None:
        """Raise :class:`~flask_chatkit.storage.version.SchemaOutdated` when the
        database's schema is older than this code (missing tables or columns, or an
        older recorded version). Call it at start-up to fail fast."""
        with self._tx() as conn:
            check_version(conn, self.metadata, self.schema_version_table, self._where())

    def schema_version(self) -> int | None:
        """The schema version recorded in the database (None: not recorded)."""
        with self._tx() as conn:
            return read_version(conn, self.schema_version_table)

    def _where(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def missing_tables(self) -> list[str]:
        """Names of this store's tables the database does not have (yet)."""
        inspector = inspect(self.engine)
        return [name for name in self.metadata.tables if not inspector.has_table(name)]

    async def ping(self) -> None:
        """``SELECT 1`` on a pooled connection (the health route's database check)."""
        await self._run(self._ping)

    def close(self) -> None:
        """Stop the worker threads (the engine stays usable if it was passed in)."""
        self._pool.shutdown()

    # -- ids ----------------------------------------------------------------------
    def generate_thread_id(self, context: Any) -> str:
        """``thr_`` + 32 hex digits (128 random bits; the SDK's default has 32 bits)."""
        thread_id = f"{_id_prefix('thread')}_{_random_hex()}"
        fresh = self._fresh_thread_ids
        fresh[thread_id] = None
        while len(fresh) > _FRESH_IDS_KEPT:  # generated but never saved: forget the oldest
            fresh.popitem(last=False)
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

    # -- sync implementations (run on the pool) ------------------------------
    def _ping(self) -> None:
        with self._tx() as conn:
            conn.exec_driver_sql("SELECT 1")

    def _load_thread(self, owner: str, thread_id: str) -> ThreadMetadata:
        t = self.threads
        with self._tx() as conn:
            payload = conn.execute(
                select(t.c.payload).where(t.c.owner == owner, t.c.id == thread_id)
            ).scalar()
        if payload is None:
            raise NotFoundError(f"Thread {thread_id} not found")
        return ThreadMetadata.model_validate(payload)

    @staticmethod
    def _thread_values(owner: str, thread: ThreadMetadata) -> dict[str, Any]:
        return {
            "owner": owner,
            "id": thread.id,
            "created_at": db_time(thread.created_at),
            "payload": _thread_payload(thread),
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
        adapter = _item_adapter()
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
        with self._tx() as conn:
            payload = conn.execute(
                select(i.c.payload).where(
                    i.c.owner == owner, i.c.thread_id == thread_id, i.c.id == item_id
                )
            ).scalar()
        if payload is None:
            raise NotFoundError(f"Item {item_id} not found")
        return _item_adapter().validate_python(payload)

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
        with self._tx() as conn:
            payload = conn.execute(
                select(a.c.payload).where(a.c.owner == owner, a.c.id == attachment_id)
            ).scalar()
        if payload is None:
            raise NotFoundError(f"Attachment {attachment_id} not found")
        return _attachment_adapter().validate_python(payload)

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
            cancelled = self._cancelled_adds
            cancelled[key] = None
            while len(cancelled) > _FRESH_IDS_KEPT:
                cancelled.popitem(last=False)
            raise
        except DuplicateIdError:
            if key not in self._cancelled_adds:
                raise
            del self._cancelled_adds[key]  # the cancelled add got there first: keep it
            return
        self._cancelled_adds.pop(key, None)

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

    # -- sync helpers for the CLI (not part of chatkit's Store) ---------------
    def iter_owner_threads(
        self, owner_key: str
    ) -> Iterator[tuple[ThreadMetadata, list[ThreadItem]]]:
        """Every thread of ``owner_key`` (oldest first) with all its items, oldest first."""
        t, i = self.threads, self.items
        with self._tx() as conn:
            threads = list(
                conn.execute(
                    select(t.c.id, t.c.payload)
                    .where(t.c.owner == owner_key)
                    .order_by(t.c.created_at, t.c.seq)
                )
            )
        adapter = _item_adapter()
        for row in threads:
            with self._tx() as conn:
                payloads = (
                    conn.execute(
                        select(i.c.payload)
                        .where(i.c.thread_id == row.id, i.c.owner == owner_key)
                        .order_by(i.c.created_at, i.c.seq)
                    )
                    .scalars()
                    .all()
                )
            items = [adapter.validate_python(p) for p in payloads]
            yield ThreadMetadata.model_validate(row.payload), items

    def export_owner(self, owner_key: str) -> Iterator[dict[str, Any]]:
        """JSON-ready ``{"thread": ..., "items": [...]}`` records for one owner."""
        for thread, items in self.iter_owner_threads(owner_key):
            yield {
                "thread": _thread_payload(thread),
                "items": [item.model_dump(mode="json") for item in items],
            }

    def prune(self, older_than: datetime, *, dry_run: bool = False) -> list[str]:
        """Delete whole threads whose last activity is before ``older_than``.

        Last activity is the newest ``created_at`` of the thread and its items.
        Returns the removed thread ids (``dry_run``: the ids, nothing removed).
        """
        cutoff = db_time(older_than)
        t, i = self.threads, self.items
        recent_item = exists().where(
            i.c.owner == t.c.owner, i.c.thread_id == t.c.id, i.c.created_at >= cutoff
        )
        query = select(t.c.owner, t.c.id).where(t.c.created_at < cutoff, ~recent_item)
        removed: list[str] = []
        attachment_ids: list[str] = []
        with self._tx(write=True) as conn:
            by_owner: dict[str, list[str]] = {}
            for owner, thread_id in conn.execute(query.order_by(t.c.created_at, t.c.seq)):
                by_owner.setdefault(owner, []).append(thread_id)
                removed.append(thread_id)
            if dry_run:
                return removed
            for owner, ids in by_owner.items():
                attachment_ids += self._delete_threads(conn, owner, ids)
        self._attachments_removed(attachment_ids)
        return removed
