"""``SQLAlchemyStore``: a ``chatkit.store.Store`` on SQLite or PostgreSQL.

Imports nothing of Flask: a FastAPI or Django ChatKit host can use it as is, with
the same contract. Every read and write is scoped by the owner key
``owner(context)``. ``save_thread`` (like every write) has persisted its data when
it returns, whoever calls it; nothing is deferred through context variables.

Where the SQL runs: on a running event loop, on native worker threads (one per
pooled connection, see :mod:`flask_chatkit.bridge.native`), so a database round trip
never stalls the loop; driven with no loop running, right where it is called.

* **Ids** carry 128 random bits behind the SDK's own prefix (the SDK's default
  carries 32). A generated thread id's first save is an insert that must not meet an
  existing thread of its owner, and an item add must not meet an item its thread
  already has: either raises :class:`DuplicateIdError` instead of overwriting or
  dropping a row.
* **Attachments** have two columns beyond the SDK's payload. ``upload_state``:
  ``pending`` (created, bytes not there yet), ``uploading`` (one upload holds the
  claim), ``done``; NULL for rows saved by other code. Claiming is one conditional
  ``UPDATE … WHERE upload_state = 'pending'``, so of two concurrent uploads exactly
  one wins. ``created_at``: when the row was first saved, so ``prune`` can reclaim
  attachments never linked to a thread. A row's ``thread_id`` is never cleared once
  set: a late save of the unlinked copy must not undo the SDK's link.
  A claim expires (see :data:`CLAIM_STALE_SECONDS`), and ``deleted`` marks a
  tombstone: a row whose thread is gone but whose bytes may still be stored.
* **Checkpoints** of a reply being streamed (``save_checkpoints``) are item rows whose
  payload carries ``CHECKPOINT_FLAG`` (ChatKit's models ignore the extra key, so a
  checkpoint reads as the item so far). The reply's final ``add_thread_item`` of the
  same owner, thread and id replaces such a row instead of raising
  :class:`DuplicateIdError`; a checkpoint never overwrites a final row.
* **Pages** are keyset pages on ``(created_at, seq)`` (ties never skip or repeat a
  row), bounded by ``limit`` and, for items, by payload bytes.
* **Maintenance** (sync, for start-up, the health route and the CLI): create and
  check the schema, export one owner, prune old threads and orphan attachments.
"""

from __future__ import annotations

import _queue
import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from datetime import datetime, timezone
from functools import cache, cached_property, lru_cache
from typing import Any, TypeVar

import greenlet
from chatkit.store import NotFoundError, Store, StoreItemType, default_generate_id
from chatkit.types import Attachment, Page, ThreadItem, ThreadMetadata
from pydantic import TypeAdapter
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    Text,
    and_,
    cast,
    delete,
    exists,
    func,
    insert,
    inspect,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..bridge.hub import HubExecutor
from ..bridge.hub_loop import HubEventLoop
from ..bridge.native import (
    NativeThreadPool,
    Outcome,
    native_lock,
    outcome_of,
    settle,
    settle_from_thread,
    start_native_thread,
)
from .schema import (
    SQLITE_BUSY_TIMEOUT_MS,
    build_engine,
    build_tables,
    engine_pool_capacity,
    is_sqlite_memory,
    psycopg_waits_cooperatively,
    psycopg_waits_natively_here,
)
from .version import check as check_version
from .version import read_version, record_version

__all__ = ["DuplicateIdError", "SQLAlchemyStore", "default_owner"]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
logger = logging.getLogger("flask_chatkit")
_CHUNK = 500
DEFAULT_MAX_PAGE_BYTES = 4 * 1024 * 1024


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# -- ids ---------------------------------------------------------------------------
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


# -- payloads: the JSON column <-> ChatKit's models ---------------------------------
_THREAD_FIELDS = frozenset(ThreadMetadata.model_fields)


@lru_cache(maxsize=1)
def item_adapter() -> TypeAdapter[ThreadItem]:
    return TypeAdapter(ThreadItem)


@lru_cache(maxsize=1)
def attachment_adapter() -> TypeAdapter[Attachment]:
    return TypeAdapter(Attachment)


# Marks an item row as a checkpoint of a reply still streaming (see save_checkpoints).
# In the payload, not a column: no schema change, and ChatKit's models drop the key.
CHECKPOINT_FLAG = "_flask_chatkit_checkpoint"


def thread_payload(thread: ThreadMetadata) -> dict[str, Any]:
    # Only ThreadMetadata's own fields: a full Thread's items are rows of their own.
    return thread.model_dump(mode="json", include=set(_THREAD_FIELDS))


# -- attachment upload states ----------------------------------------------------
PENDING, UPLOADING, DONE = "pending", "uploading", "done"
# A tombstone: the thread (or the unsent upload) is gone, the bytes may not be. The
# row stays, invisible to every read, until the blob storage confirms the delete:
# a thread deleted while S3 is down keeps a row leading to each of its objects, and
# ``prune`` (or the next delete that reaches the storage) removes them later. Chosen
# over answering 503: deleting a thread is what a user asks for when leaving, and it
# should not depend on a second service; no new table means no schema migration.
DELETED = "deleted"
# A claim is ``c:<unix seconds>`` (12 characters: fits the VARCHAR(16) column, so no
# schema change): the time it was taken or last refreshed. The upload route refreshes
# it every CLAIM_REFRESH_SECONDS while bytes arrive; a claim not refreshed for
# CLAIM_STALE_SECONDS belongs to a dead worker or to an upload whose final write and
# release both failed, and the next upload may take it. The plain "uploading" of
# older versions has no time: it counts as stale.
CLAIM_PREFIX = "c:"
CLAIM_STALE_SECONDS = 60
CLAIM_REFRESH_SECONDS = 20
# Tombstones retried after a delete that reached the storage (bounded per call).
TOMBSTONES_PER_RETRY = 100
_ADDED_COLUMNS = {"created_at": "TIMESTAMP", "upload_state": "VARCHAR(16)"}


def upload_state_of(attachment: Attachment) -> str | None:
    """The state implied by a payload this package wrote (``metadata.uploaded``)."""
    metadata = attachment.metadata or {}
    if "uploaded" not in metadata:
        return None
    return DONE if metadata.get("uploaded") else PENDING


def _utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def claim_token(at: float) -> str:
    """The upload_state of a claim taken (or refreshed) at ``at`` (unix seconds)."""
    return f"{CLAIM_PREFIX}{int(at):010d}"


def _visible(a: Table) -> Any:
    """Rows that are not tombstones (see :data:`DELETED`)."""
    return a.c.upload_state.is_(None) | (a.c.upload_state != DELETED)


def _claimed(a: Table) -> Any:
    return (a.c.upload_state == UPLOADING) | a.c.upload_state.like(f"{CLAIM_PREFIX}%")


# -- SQL shared by the queries ---------------------------------------------------
def db_time(value: datetime) -> datetime:
    """The sortable column value: naive UTC (naive input is taken as is)."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=None)
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def dialect_insert(dialect: str, table: Table) -> Any:
    """INSERT with ON CONFLICT support (PostgreSQL, SQLite), else None."""
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    return None


def upsert(conn: Connection, table: Table, keys: Sequence[str], values: dict[str, Any]) -> None:
    """Insert ``values`` or update the row with the same ``keys``."""
    stmt = _upsert_statement(conn.dialect.name, table, tuple(keys), tuple(values))
    if stmt is not None:
        conn.execute(stmt, values)
        return
    changed = {k: v for k, v in values.items() if k not in keys}
    where = and_(*(table.c[k] == values[k] for k in keys))
    if conn.execute(update(table).where(where).values(**changed)).rowcount == 0:
        conn.execute(insert(table).values(**values))


# The statements of the write path are built once and run with each call's values:
# building an INSERT .. ON CONFLICT per call cost SQLAlchemy more than running it.
@lru_cache(maxsize=64)
def _upsert_statement(
    dialect: str, table: Table, keys: tuple[str, ...], columns: tuple[str, ...]
) -> Any:
    stmt = dialect_insert(dialect, table)
    if stmt is None:
        return None
    changed = {c: stmt.excluded[c] for c in columns if c not in keys}
    return stmt.on_conflict_do_update(index_elements=list(keys), set_=changed)


@lru_cache(maxsize=64)
def _insert_new_statement(dialect: str, table: Table, keys: tuple[str, ...]) -> Any:
    stmt = dialect_insert(dialect, table)
    if stmt is None:
        return None
    # RETURNING, not rowcount: with implicit RETURNING psycopg reports rowcount -1.
    return stmt.on_conflict_do_nothing(index_elements=list(keys)).returning(table.c[keys[-1]])


def insert_new(conn: Connection, table: Table, keys: Sequence[str], values: dict[str, Any]) -> bool:
    """Insert ``values`` unless a row with the same ``keys`` exists; False if one did.

    The existing row is left as it is. Racing inserts of one key: exactly one wins.
    """
    stmt = _insert_new_statement(conn.dialect.name, table, tuple(keys))
    if stmt is not None:
        return conn.execute(stmt, values).first() is not None
    try:
        with conn.begin_nested():
            conn.execute(insert(table).values(**values))
    except IntegrityError:
        return False
    return True


def keyset_page(
    conn: Connection,
    table: Table,
    scope: Any,
    after: str | None,
    limit: int,
    order: str,
    what: str,
    max_bytes: int | None = None,
) -> tuple[list[Any], bool]:
    """A page of (id, payload) rows after the ``after`` id, ordered by (created_at, seq);
    and whether more rows follow. An unknown ``after`` raises NotFoundError.

    With ``max_bytes``, the page also ends once the payloads before a row add up
    to ``max_bytes`` (the first row always comes, so paging always advances); the
    database drops the rows past the budget, so their payloads are never fetched.
    """
    cols = (table.c.created_at, table.c.seq)
    desc = order == "desc"
    conditions = [scope]
    if after is not None:
        cursor = conn.execute(select(*cols).where(scope, table.c.id == after)).first()
        if cursor is None:
            raise NotFoundError(f"{what} {after} not found")
        key = tuple_(*cols)
        conditions.append(key < tuple_(*cursor) if desc else key > tuple_(*cursor))
    ordering = [c.desc() for c in cols] if desc else list(cols)
    limit = max(limit, 0)
    if max_bytes is None:
        query = select(table.c.id, table.c.payload).where(*conditions).order_by(*ordering)
        rows = list(conn.execute(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit
    return _byte_bounded_page(conn, table, conditions, desc, limit, max_bytes)


def _payload_bytes(table: Table, dialect: str) -> Any:
    text = cast(table.c.payload, Text)
    return func.length(text) if dialect == "sqlite" else func.octet_length(text)


def _byte_bounded_page(
    conn: Connection,
    table: Table,
    conditions: list[Any],
    desc: bool,
    limit: int,
    max_bytes: int,
) -> tuple[list[Any], bool]:
    def ordered(cols: tuple[Any, ...]) -> list[Any]:
        return [c.desc() for c in cols] if desc else list(cols)

    # page: the next limit + 1 rows with their payload sizes; then, per row, the
    # bytes of the rows ahead of it and how many rows the page has.
    page = (
        select(
            table.c.id,
            table.c.payload,
            table.c.created_at,
            table.c.seq,
            _payload_bytes(table, conn.dialect.name).label("size"),
        )
        .where(*conditions)
        .order_by(*ordered((table.c.created_at, table.c.seq)))
        .limit(limit + 1)
        .subquery("page")
    )
    page_order = ordered((page.c.created_at, page.c.seq))
    sized = select(
        page.c.id,
        page.c.payload,
        page.c.created_at,
        page.c.seq,
        (func.sum(page.c.size).over(order_by=page_order) - page.c.size).label("before"),
        func.count().over().label("fetched"),
    ).subquery("sized")
    query = (
        select(sized.c.id, sized.c.payload, sized.c.fetched)
        .where(sized.c.before < max_bytes)
        .order_by(*ordered((sized.c.created_at, sized.c.seq)))
    )
    rows = list(conn.execute(query))
    kept = rows[:limit]
    return kept, bool(rows) and rows[0].fetched > len(kept)


# -- SQLite group commit ------------------------------------------------------------
_STOP = object()
MAX_GROUP = 64  # most writes one group commit carries


def _writes(fn: Callable[..., T]) -> Callable[..., T]:
    """Mark a sync method that writes: on SQLite it runs in the group writer's transaction."""
    fn._chatkit_writes = True  # type: ignore[attr-defined]
    return fn


class _GroupWriter:
    """Commits every SQLite write queued meanwhile in one transaction.

    SQLite has one writer at a time. Several store threads each committing their own
    write take turns on the database lock, and a thread that finds it taken sleeps in
    SQLite's busy handler. Here the writes that arrive together run one after the
    other on one connection, each in a SAVEPOINT of a shared ``BEGIN IMMEDIATE``
    transaction (so one that fails is rolled back alone), and one COMMIT stores them
    all. Each caller's await returns only after the COMMIT that holds its own write;
    if that COMMIT fails, every write of the group fails with it. Work that must wait
    for the commit (deleting files of removed rows) runs after it on a reader thread,
    and its write's caller is answered once that work is done.

    Groups run in one of two places:

    - :meth:`run`: on a native thread of its own, started with the first write.
    - :meth:`run_on_loop`: on the loop itself, when the loop is a greenlet on the
      gevent hub. A native thread there would wait for the GIL behind the busy hub at
      every SQLite call (the ``sqlite3`` module lets the GIL go around each one), and
      the group's Python work costs the hub's thread the same either way. The loop's
      connection never sleeps in SQLite's busy handler (that would stall the hub):
      a group that finds the database locked by another process is retried with
      ``call_later``, up to the same busy timeout. Its commits do not checkpoint the
      WAL either (the checkpoint's writes and ``fsync`` would stall the hub too): a
      reader thread runs a passive checkpoint at most once a second instead.
    """

    def __init__(self, store: SQLAlchemyStore) -> None:
        self._store = store
        self.conn: Connection | None = None  # the group's connection, while one runs
        self._runner: Any = None  # the greenlet (or thread) running the group's writes
        self.after_commit: list[Callable[[], None]] = []
        # On a native thread of its own.
        self._jobs: _queue.SimpleQueue[Any] = _queue.SimpleQueue()
        self._start_lock = native_lock()
        self.thread_started = False  # the thread starts with the first write, if ever
        # On the loop.
        self._loop_jobs: list[Any] = []
        self._loop_conn: Connection | None = None
        self._flush: asyncio.Handle | None = None  # the loop's next group, if scheduled
        self._last_checkpoint = time.monotonic()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.thread_started:
            with self._start_lock:
                if not self.thread_started:
                    start_native_thread(self._serve)
                    self.thread_started = True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return await future

    async def run_on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._loop_jobs.append((loop, future, fn, args))
        if self._flush is None:  # writes queued before it runs join the group
            self._flush = loop.call_soon(self._commit_on_loop, loop, 0.0)
        return await future

    def stop(self) -> None:
        self._jobs.put(_STOP)
        if self._loop_conn is not None:
            # Its pragmas are the loop's own: never hand it back to the pool.
            self._loop_conn.invalidate()
            self._loop_conn = None

    def group_conn(self) -> Connection | None:
        """The group's connection when called by a write the group is running, else None."""
        conn = self.conn
        return conn if conn is not None and self._runner is greenlet.getcurrent() else None

    @staticmethod
    @contextlib.contextmanager
    def savepoint(conn: Connection) -> Iterator[None]:
        """One write of the group, rolled back alone if it fails.

        The SAVEPOINT goes to the driver's connection directly: SQLAlchemy's
        ``begin_nested()`` compiles its SAVEPOINT and RELEASE statements anew each
        time, more work than a small write (a new thread, a message) itself, and
        under gevent the group holds the hub while it runs. SQLAlchemy's own nested
        transactions inside a write still work: their savepoints have names of their
        own.
        """
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None  # the group holds the connection checked out
        cursor = dbapi.cursor()
        cursor.execute("SAVEPOINT chatkit_write")
        try:
            yield
        except BaseException:
            cursor.execute("ROLLBACK TO SAVEPOINT chatkit_write")
            cursor.execute("RELEASE SAVEPOINT chatkit_write")
            raise
        cursor.execute("RELEASE SAVEPOINT chatkit_write")

    # -- on a native thread ---------------------------------------------------
    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            group = [job]
            while len(group) < MAX_GROUP:
                try:
                    job = self._jobs.get_nowait()
                except _queue.Empty:
                    break
                if job is _STOP:
                    self._jobs.put(_STOP)  # after this group
                    break
                group.append(job)
            try:
                with self._store.engine.connect() as conn:
                    done = self._commit(conn, group)
            except BaseException as exc:  # the COMMIT (or BEGIN) failed: nothing is stored
                done = _failed(group, exc)
            self._answer(group, done, on_loop=False)

    # -- on the loop ----------------------------------------------------------
    def _commit_on_loop(self, loop: asyncio.AbstractEventLoop, waited: float) -> None:
        self._flush = None
        group = self._loop_jobs[:MAX_GROUP]
        try:
            done = self._commit(self._loop_connection(), group)
        except _DatabaseLocked as locked:
            if waited < SQLITE_BUSY_TIMEOUT_MS / 1000:  # nothing ran: try again soon
                delay = min(0.002 + waited / 2, 0.1)
                self._flush = loop.call_later(delay, self._commit_on_loop, loop, waited + delay)
                return
            done = _failed(group, locked)
        except BaseException as exc:
            done = _failed(group, exc)
        del self._loop_jobs[: len(group)]
        if self._loop_jobs:
            self._flush = loop.call_soon(self._commit_on_loop, loop, 0.0)
        self._answer(group, done, on_loop=True)
        now = time.monotonic()
        if now - self._last_checkpoint >= 1.0:
            self._last_checkpoint = now
            with contextlib.suppress(RuntimeError):  # the pool is shut down
                self._store._pool.submit(self._store._checkpoint_wal)

    def _loop_connection(self) -> Connection:
        conn = self._loop_conn
        if conn is None or conn.invalidated or conn.closed:
            conn = self._store.engine.connect()
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
            conn.commit()  # ends SQLAlchemy's autobegun transaction (pragmas stay set)
            self._loop_conn = conn
        return conn

    # -- either ---------------------------------------------------------------
    def _commit(self, conn: Connection, group: list[Any]) -> list[tuple[Outcome, list[Any]]]:
        """Run the group's writes in one transaction on ``conn``: each write's outcome
        and its work after the commit. Raises if BEGIN or COMMIT fails
        (:class:`_DatabaseLocked` if BEGIN found the database locked)."""
        done: list[tuple[Outcome, list[Any]]] = []
        with conn.begin():
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except DBAPIError as exc:
                if "locked" in str(exc.orig) or "busy" in str(exc.orig):
                    raise _DatabaseLocked from exc
                raise
            self.conn, self._runner = conn, greenlet.getcurrent()
            try:
                # Each write's own _tx() is a SAVEPOINT of this transaction.
                for _, _, fn, args in group:
                    self.after_commit = []
                    done.append((outcome_of(fn, *args), self.after_commit))
            finally:
                self.conn, self._runner = None, None
                self.after_commit = []
        return done

    def _answer(
        self, group: list[Any], done: list[tuple[Outcome, list[Any]]], *, on_loop: bool
    ) -> None:
        for job, (outcome, after) in zip(group, done, strict=True):
            if after:
                # Blob deletes talk to a second service (S3 may be slow or down): on a
                # reader thread, so the writer goes on committing; the write's caller
                # is answered once they are done, as without group commit.
                try:
                    self._store._pool.submit(_run_then_settle, after, job, outcome)
                except RuntimeError:  # the pool is shut down (the store is closing)
                    _run_then_settle(after, job, outcome)
            elif on_loop:
                settle(job[1], *outcome)
            else:
                settle_from_thread(job[0], job[1], outcome)


class _DatabaseLocked(Exception):
    """``BEGIN IMMEDIATE`` found the database locked by another connection."""


def _failed(group: list[Any], exc: BaseException) -> list[tuple[Outcome, list[Any]]]:
    if isinstance(exc, _DatabaseLocked) and exc.__cause__ is not None:
        exc = exc.__cause__  # the driver's own "database is locked"
    return [((False, exc), []) for _ in group]


def _run_then_settle(
    actions: list[Callable[[], None]], job: tuple[Any, ...], outcome: tuple[bool, Any]
) -> None:
    for action in actions:
        try:
            action()
        except Exception:  # e.g. the blob storage is down: its tombstones wait for prune
            logger.exception("work after a group commit failed")
    settle_from_thread(job[0], job[1], outcome)


def default_owner(context: Any) -> str:
    """The default owner key: ``context.user_id``."""
    key: str = getattr(context, "user_id")  # noqa: B009 - any context with a user_id
    return key


class SQLAlchemyStore(Store[Any]):
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
        # A page of items or threads also ends once its payloads reach this many
        # bytes (None: no bound).
        self.max_page_bytes = max_page_bytes
        # Called (sync, after commit) with the ids of attachment rows removed along
        # with their threads, so their files can go too; the extension wires it.
        # It answers the ids whose bytes are gone (None: all of them); the others stay
        # tombstones until a later try (``retry_attachment_deletes``, ``prune``).
        self.on_attachments_deleted: Callable[[list[str]], Sequence[str] | None] | None = None
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
        # A SQLite file's writes go to one group writer; the other connections read.
        self._writer = _GroupWriter(self) if self._sqlite and not self._memory else None
        if self._writer is not None:
            workers = max(1, workers - 1)
        self._psycopg = self.engine.driver == "psycopg"
        self._pool: NativeThreadPool = NativeThreadPool(
            max_workers=workers,
            name="chatkit-store",
            on_start=psycopg_waits_natively_here if self._psycopg else None,
        )
        # Store calls made as greenlets on the hub (_hub_for): at most as many at
        # once as the pool has threads, one per connection the engine can hand out.
        self._hub_slots: Any = None
        self._hub_capacity = workers

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking database work where it never stalls the loop's other tasks.

        Driven with no loop running (the Flask view answers store reads on the
        request's own greenlet or thread), there is nothing to stall: the work runs
        here, and the call costs no thread hand-off. On a loop that is a greenlet on
        the gevent hub, SQLite answers on the loop (writes through the group writer's
        :meth:`~_GroupWriter.run_on_loop`) and psycopg in a greenlet (:meth:`_hub_for`).
        Otherwise the work goes to a worker thread (SQLite writes to the group writer's).
        """
        if not _loop_running():
            with self._guard:  # the in-memory database's one connection
                return fn(*args)
        if self._pid != os.getpid():  # forked (e.g. gunicorn): the workers stayed behind
            self.engine.dispose(close=False)  # the parent's connections are not ours
            self._start_workers()
        loop = asyncio.get_running_loop()
        writer = self._writer
        if writer is not None:  # a SQLite file
            writes = getattr(fn, "_chatkit_writes", False)
            if isinstance(loop, HubEventLoop):
                # The loop is the hub's own greenlet: SQLite answers here, in C,
                # with no lock to wait for on a read (WAL) and none on a write but
                # the one the group writer waits for without blocking.
                return await writer.run_on_loop(fn, *args) if writes else fn(*args)
            if writes:
                return await writer.run(fn, *args)
        hub = self._hub_for(loop)
        if hub is not None:
            return await hub.run(self._in_hub_slot, fn, *args)
        return await self._pool.run(fn, *args)

    def _checkpoint_wal(self) -> None:
        """Copy the WAL's committed pages into the database file, waiting for no one."""
        with self.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")

    def _hub_for(self, loop: asyncio.AbstractEventLoop) -> HubExecutor | None:
        """The gevent hub to run a store call on as a greenlet, if not a native thread.

        Under gevent with the loop on the hub (``CHATKIT_LOOP = "hub"``), and only
        through psycopg (3) when it waits cooperatively. A native thread costs two
        GIL hand-offs per call and, under a burst, waits for the GIL behind the busy
        hub; a greenlet's query costs the hub only the query's own Python work.
        Another driver (psycopg2 without psycogreen) would block the hub: threads.
        """
        if not self._psycopg or not isinstance(loop, HubEventLoop):
            return None
        return loop.hub if psycopg_waits_cooperatively() else None

    def _in_hub_slot(self, fn: Callable[..., T], *args: Any) -> T:
        # More calls at once than the engine has connections would wait in
        # SQLAlchemy's pool and fail after its pool_timeout; here they queue, as
        # they do for the pool's threads.
        slots = self._hub_slots
        if slots is None:
            from gevent.lock import Semaphore

            slots = self._hub_slots = Semaphore(self._hub_capacity)
        with slots:
            return fn(*args)

    # -- plumbing -------------------------------------------------------------
    def owner_key(self, context: Any) -> str:
        key = self._owner(context)
        if not isinstance(key, str) or not key:
            raise ValueError(f"owner key must be a non-empty string, got {key!r}")
        return key

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[Connection]:
        """One transaction; on SQLite a write takes the write lock up front.

        On the group writer's thread: a SAVEPOINT of the group's transaction.
        """
        group_conn = self._writer.group_conn() if self._writer is not None else None
        if group_conn is not None:
            with _GroupWriter.savepoint(group_conn):
                yield group_conn
            return
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
        if self._writer is not None:
            self._writer.stop()

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

    @_writes
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
            rows, more = keyset_page(
                conn, t, t.c.owner == owner, after, limit, order, "Thread", self.max_page_bytes
            )
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

    def _item_key(self, owner: str, thread_id: str, item_id: str) -> Any:
        i = self.items
        return and_(i.c.owner == owner, i.c.thread_id == thread_id, i.c.id == item_id)

    def _is_checkpoint(self) -> Any:
        return self.items.c.payload[CHECKPOINT_FLAG].as_boolean().is_(True)

    @cached_property
    def _unless_final(self) -> Any:
        """INSERT an item row, or update the row of its key if that is a checkpoint (a
        final row stays). None on a dialect without ON CONFLICT. Built once, like the
        statements of :func:`upsert`."""
        stmt = dialect_insert(self.dialect, self.items)
        if stmt is None:
            return None
        return stmt.on_conflict_do_update(
            index_elements=["owner", "thread_id", "id"],
            set_={"created_at": stmt.excluded.created_at, "payload": stmt.excluded.payload},
            where=self._is_checkpoint(),
        )

    @cached_property
    def _add_or_replace_checkpoint(self) -> Any:
        """:attr:`_unless_final` RETURNING the id: no row means a final row is there."""
        stmt = self._unless_final
        return None if stmt is None else stmt.returning(self.items.c.id)

    @_writes
    def _add_thread_item(self, owner: str, thread_id: str, item: ThreadItem) -> None:
        values = self._item_values(owner, thread_id, item)
        with self._tx(write=True) as conn:
            # Never an overwrite, never a silent drop: the SDK only adds new items,
            # so an id the thread already holds is a clash. Items of other threads
            # and owners with the same id are other rows, untouched. The one
            # exception: a checkpoint of this very reply, which the final item replaces.
            stmt = self._add_or_replace_checkpoint
            if stmt is not None:  # one statement: inserted, or a checkpoint replaced
                if conn.execute(stmt, values).first() is None:
                    raise DuplicateIdError(f"Item {item.id} already exists in thread {thread_id}")
                return
            if insert_new(conn, self.items, ("owner", "thread_id", "id"), values):
                return
            replaced = conn.execute(
                update(self.items)
                .where(self._item_key(owner, thread_id, item.id), self._is_checkpoint())
                .values(created_at=values["created_at"], payload=values["payload"])
            ).rowcount
            if replaced != 1:
                raise DuplicateIdError(f"Item {item.id} already exists in thread {thread_id}")

    @_writes
    def _save_checkpoints(self, rows: Sequence[tuple[str, str, ThreadItem]]) -> None:
        """Insert each row, or update an earlier checkpoint of it; final rows stay."""
        keys = ["owner", "thread_id", "id"]
        latest: dict[tuple[str, str, str], dict[str, Any]] = {}
        for owner, thread_id, item in rows:  # one statement may not touch a row twice
            values = self._item_values(owner, thread_id, item)
            values["payload"][CHECKPOINT_FLAG] = True
            latest[(owner, thread_id, item.id)] = values
        with self._tx(write=True) as conn:
            if self._unless_final is not None:  # one statement for all
                conn.execute(self._unless_final, list(latest.values()))
                return
            for (owner, thread_id, item_id), values in latest.items():
                changed = {"created_at": values["created_at"], "payload": values["payload"]}
                where = (self._item_key(owner, thread_id, item_id), self._is_checkpoint())
                if conn.execute(update(self.items).where(*where).values(**changed)).rowcount == 0:
                    insert_new(conn, self.items, keys, values)  # a final row stays as it is

    @_writes
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

    @_writes
    def _delete_thread_item(self, owner: str, thread_id: str, item_id: str) -> None:
        i = self.items
        with self._tx(write=True) as conn:
            conn.execute(
                delete(i).where(i.c.owner == owner, i.c.thread_id == thread_id, i.c.id == item_id)
            )

    def _delete_threads(
        self, conn: Connection, owner: str, ids: Sequence[str]
    ) -> list[tuple[str, str]]:
        """Delete threads with their items; their attachment rows become tombstones
        (removed once their bytes are, see :data:`DELETED`). Returns (owner, id) pairs."""
        a = self.attachments
        attachments: list[tuple[str, str]] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            attachments += [
                (owner, attachment_id)
                for attachment_id in conn.execute(
                    select(a.c.id).where(a.c.owner == owner, a.c.thread_id.in_(chunk))
                ).scalars()
            ]
            conn.execute(
                update(a)
                .where(a.c.owner == owner, a.c.thread_id.in_(chunk))
                .values(upload_state=DELETED)
            )
            for table, col in (
                (self.items, self.items.c.thread_id),
                (self.threads, self.threads.c.id),
            ):
                conn.execute(delete(table).where(table.c.owner == owner, col.in_(chunk)))
        return attachments

    def _attachments_removed(self, tombstones: list[tuple[str, str]]) -> bool:
        """After commit: remove the bytes of these tombstones, then the tombstones
        whose bytes are gone. True when every one went (the storage answered)."""
        if not tombstones:
            return True
        callback = self.on_attachments_deleted
        ids = [attachment_id for _, attachment_id in tombstones]
        if callback is None:  # nothing keeps bytes for this store
            gone = set(ids)
        else:
            try:
                answer = callback(ids)
            except Exception:  # the tombstones stay; prune retries them
                logger.warning("attachment bytes not removed yet (%d kept)", len(ids))
                answer = []
            # A callback answering None (older code) removed them all.
            gone = set(ids) if answer is None else set(answer)
        done = [(owner, i) for owner, i in tombstones if i in gone]
        a = self.attachments
        for start in range(0, len(done), _CHUNK):
            chunk = done[start : start + _CHUNK]
            with self._tx(write=True) as conn:
                conn.execute(
                    delete(a).where(
                        tuple_(a.c.owner, a.c.id).in_(chunk), a.c.upload_state == DELETED
                    )
                )
        return len(done) == len(tombstones)

    def retry_attachment_deletes(self, limit: int | None = None) -> int:
        """Remove the bytes and rows of tombstones left by earlier deletes (the blob
        storage was unreachable then); returns how many are still left."""
        a = self.attachments
        query = select(a.c.owner, a.c.id).where(a.c.upload_state == DELETED).order_by(a.c.seq)
        with self._tx() as conn:
            rows = [(str(o), str(i)) for o, i in conn.execute(query.limit(limit))]
        for start in range(0, len(rows), _CHUNK):
            if not self._attachments_removed(rows[start : start + _CHUNK]):
                break  # still unreachable: the rest waits for the next try
        with self._tx() as conn:
            left = conn.execute(
                select(func.count()).select_from(a).where(a.c.upload_state == DELETED)
            ).scalar()
        return int(left or 0)

    @_writes
    def _delete_thread(self, owner: str, thread_id: str) -> None:
        with self._tx(write=True) as conn:
            removed = self._delete_threads(conn, owner, [thread_id])
        if removed:
            self._after_commit(lambda: self._remove_bytes(removed))

    def _remove_bytes(self, tombstones: list[tuple[str, str]]) -> None:
        if self._attachments_removed(tombstones):
            # The storage answers: also retry what earlier deletes could not remove.
            self.retry_attachment_deletes(TOMBSTONES_PER_RETRY)

    def _after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the write in progress is committed: at once, or inside a
        group commit, after the group's COMMIT (before its callers are answered)."""
        writer = self._writer
        if writer is not None and writer.group_conn() is not None:
            writer.after_commit.append(action)
            return
        action()

    def _load_attachment(self, owner: str, attachment_id: str) -> Attachment:
        a = self.attachments
        payload = self._payload(
            a,
            f"Attachment {attachment_id} not found",
            a.c.owner == owner,
            a.c.id == attachment_id,
            _visible(a),
        )
        return attachment_adapter().validate_python(payload)

    @_writes
    def _delete_attachment(self, owner: str, attachment_id: str) -> None:
        a = self.attachments
        with self._tx(write=True) as conn:
            conn.execute(delete(a).where(a.c.owner == owner, a.c.id == attachment_id))

    # -- chatkit.store.Store ---------------------------------------------------
    async def load_thread(self, thread_id: str, context: Any) -> ThreadMetadata:
        return await self._run(self._load_thread, self.owner_key(context), thread_id)

    async def save_thread(self, thread: ThreadMetadata, context: Any) -> None:
        """Persist the thread's metadata; stored when this returns, whoever calls it.

        The first save of an id this store generated is an insert that must not
        meet an existing thread of the owner (:class:`DuplicateIdError`).
        """
        owner = self.owner_key(context)
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
        await self._insert_item(self.owner_key(context), thread_id, item)

    async def save_item(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        await self._run(self._save_item, self.owner_key(context), thread_id, item)

    async def save_checkpoint(self, thread_id: str, item: ThreadItem, context: Any) -> None:
        """Save a reply still streaming: the item so far, marked as a checkpoint.

        Not part of chatkit's Store. Inserts the row, or updates an earlier
        checkpoint of it; a final row (already added) is kept. The reply's final
        ``add_thread_item`` (or ``save_item``) replaces the checkpoint, under the
        same id.
        """
        await self.save_checkpoints([(thread_id, item, context)])

    async def save_checkpoints(self, rows: Sequence[tuple[str, ThreadItem, Any]]) -> None:
        """:meth:`save_checkpoint` for many ``(thread_id, item, context)`` rows at once:
        one transaction, one statement. The Flask view calls it every
        ``CHATKIT_CHECKPOINT_SECONDS`` with the replies of all streams of a worker,
        so a worker killed mid-reply leaves the text up to the last checkpoint.
        """
        owned = [(self.owner_key(context), thread_id, item) for thread_id, item, context in rows]
        if owned:
            await self._run(self._save_checkpoints, owned)

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
        await self._run(self._delete_thread, self.owner_key(context), thread_id)

    async def delete_thread_item(self, thread_id: str, item_id: str, context: Any) -> None:
        owner = self.owner_key(context)
        await self._run(self._delete_thread_item, owner, thread_id, item_id)

    # -- ids ---------------------------------------------------------------------
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

    async def _insert_item(self, owner: str, thread_id: str, item: ThreadItem) -> None:
        key = (owner, thread_id, item.id)
        try:
            await self._run(self._add_thread_item, owner, thread_id, item)
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

    # -- schema ---------------------------------------------------------------
    def _add_attachment_columns(self, conn: Connection) -> None:
        """Tables made before these columns existed get them (nullable, no rewrite)."""
        present = {c["name"] for c in inspect(conn).get_columns(self.attachments.name)}
        for name, sql_type in _ADDED_COLUMNS.items():
            if name not in present:
                conn.execute(
                    text(f"ALTER TABLE {self.attachments.name} ADD COLUMN {name} {sql_type}")
                )

    # -- rows -----------------------------------------------------------------
    @_writes
    def _save_attachment(self, owner: str, attachment: Attachment) -> None:
        a = self.attachments
        payload = attachment.model_dump(mode="json")
        with self._tx(write=True) as conn:
            row = conn.execute(
                select(a.c.thread_id, a.c.upload_state)
                .where(a.c.owner == owner, a.c.id == attachment.id)
                .with_for_update()
            ).first()
            if row is None:
                values = {
                    "owner": owner,
                    "id": attachment.id,
                    "thread_id": attachment.thread_id,
                    "payload": payload,
                    "created_at": _utcnow(),
                    "upload_state": upload_state_of(attachment),
                }
                try:
                    with conn.begin_nested():
                        conn.execute(insert(a).values(**values))
                    return
                except IntegrityError:  # saved concurrently: update that row below
                    row = conn.execute(
                        select(a.c.thread_id, a.c.upload_state).where(
                            a.c.owner == owner, a.c.id == attachment.id
                        )
                    ).first()
            if row is not None and row.upload_state == DELETED:
                return  # a tombstone waiting for its bytes to go: never revived
            thread_id = attachment.thread_id
            if thread_id is None and row is not None and row.thread_id is not None:
                thread_id = row.thread_id  # never unlink
                payload["thread_id"] = thread_id
            changes: dict[str, Any] = {"thread_id": thread_id, "payload": payload}
            if row is not None and row.upload_state in (None, DONE):
                changes["upload_state"] = upload_state_of(attachment) or row.upload_state
            if row is not None and row.upload_state == DONE:
                # Bytes arrived: a stale copy saying "not uploaded" must not reopen it.
                payload["metadata"] = {**(payload.get("metadata") or {}), "uploaded": True}
                payload["upload_descriptor"] = None
                changes["upload_state"] = DONE
            conn.execute(
                update(a).where(a.c.owner == owner, a.c.id == attachment.id).values(**changes)
            )

    @_writes
    def _set_upload_state(
        self, owner: str, attachment_id: str, before: Any, after: str, payload: Any = None
    ) -> bool:
        """One conditional UPDATE; ``before`` is a state or a SQL condition on the row."""
        a = self.attachments
        values: dict[str, Any] = {"upload_state": after}
        if payload is not None:
            values["payload"] = payload
        condition = a.c.upload_state == before if isinstance(before, str) else before
        with self._tx(write=True) as conn:
            result = conn.execute(
                update(a)
                .where(a.c.owner == owner, a.c.id == attachment_id, condition)
                .values(**values)
            )
        return bool(result.rowcount == 1)

    def _claim(self, owner: str, attachment_id: str) -> str | None:
        a = self.attachments
        now = time.time()
        stale = claim_token(now - CLAIM_STALE_SECONDS)
        free = (
            (a.c.upload_state == PENDING)
            | (a.c.upload_state == UPLOADING)
            | (a.c.upload_state.like(f"{CLAIM_PREFIX}%") & (a.c.upload_state < stale))
        )
        token = claim_token(now)
        return token if self._set_upload_state(owner, attachment_id, free, token) else None

    def _held(self, token: str | None) -> Any:
        """The row's claim: exactly ``token``, or any claim when no token is given."""
        a = self.attachments
        return _claimed(a) if token is None else a.c.upload_state == token

    # -- async API used by flask_chatkit.attachments ---------------------------
    async def claim_attachment_upload(self, attachment_id: str, context: Any) -> str | None:
        """Take the right to upload this attachment's bytes: the claim's token, or
        None when another live upload holds it or the bytes are there already.

        A claim not refreshed for :data:`CLAIM_STALE_SECONDS` is taken over."""
        return await self._run(self._claim, self.owner_key(context), attachment_id)

    async def refresh_attachment_claim(
        self, attachment_id: str, context: Any, token: str
    ) -> str | None:
        """Keep a claim alive while bytes arrive: the new token, None if it was lost."""
        owner = self.owner_key(context)
        fresh = claim_token(time.time())
        held = await self._run(self._set_upload_state, owner, attachment_id, token, fresh)
        return fresh if held else None

    async def release_attachment_upload(
        self, attachment_id: str, context: Any, token: str | None = None
    ) -> bool:
        """Give a failed upload's claim back, so the client may try again."""
        owner = self.owner_key(context)
        held = self._held(token)
        return await self._run(self._set_upload_state, owner, attachment_id, held, PENDING)

    async def complete_attachment_upload(
        self,
        attachment: Attachment,
        context: Any,
        *,
        claimed: bool = True,
        token: str | None = None,
    ) -> bool:
        """Store the uploaded row, only if this caller still holds the claim.

        ``claimed=False`` completes straight from ``pending`` (bytes put into the
        bucket with a presigned URL, checked by the caller).
        """
        owner = self.owner_key(context)
        before = self._held(token) if claimed else PENDING
        payload = attachment.model_dump(mode="json")
        return await self._run(self._set_upload_state, owner, attachment.id, before, DONE, payload)

    async def pending_attachment_bytes(
        self, context: Any, excluding: str | None = None, *, unconfirmed: bool = False
    ) -> int:
        """Bytes of the owner's uploaded (or uploading) attachments not sent in a message
        yet: what ``CHATKIT_MAX_PENDING_ATTACHMENT_BYTES`` bounds. ``unconfirmed`` also
        counts the declared size of ``pending`` rows (their bytes may already be in a
        bucket a client uploads to directly)."""
        owner = self.owner_key(context)
        return await self._run(self._pending_bytes, owner, excluding, unconfirmed)

    def _pending_bytes(self, owner: str, excluding: str | None, unconfirmed: bool) -> int:
        a = self.attachments
        states = (a.c.upload_state == DONE) | _claimed(a)
        if unconfirmed:
            states = states | (a.c.upload_state == PENDING)
        query = select(a.c.payload).where(a.c.owner == owner, a.c.thread_id.is_(None), states)
        if excluding is not None:
            query = query.where(a.c.id != excluding)
        total = 0
        with self._tx() as conn:
            for payload in conn.execute(query).scalars():
                size = ((payload or {}).get("metadata") or {}).get("size")
                total += size if isinstance(size, int) and size > 0 else 0
        return total

    # -- orphans ----------------------------------------------------------------
    def _orphan_attachments(self, conn: Connection, cutoff: datetime) -> list[tuple[str, str]]:
        """Rows never linked to a thread, or linked to a thread of their owner that does
        not exist (its insert failed, or it went without its rows): created before
        ``cutoff``. Tombstones are not listed (``retry_attachment_deletes`` has them)."""
        a, t = self.attachments, self.threads
        # NULL created_at: rows from before the column existed, of unknown age.
        old = a.c.created_at.is_(None) | (a.c.created_at < db_time(cutoff))
        thread_exists = exists().where(t.c.owner == a.c.owner, t.c.id == a.c.thread_id)
        unlinked = a.c.thread_id.is_(None) | ~thread_exists
        query = select(a.c.owner, a.c.id).where(unlinked, old, _visible(a)).order_by(a.c.seq)
        return [(str(owner), str(attachment_id)) for owner, attachment_id in conn.execute(query)]

    def prune_orphan_attachments(
        self, older_than: datetime, *, dry_run: bool = False
    ) -> list[tuple[str, str]]:
        """Remove attachment rows not linked to an existing thread and created before
        ``older_than``, and retry the byte deletes earlier deletes could not finish.

        Returns ``(owner, attachment_id)`` pairs; the rows become tombstones, removed
        with their bytes (``on_attachments_deleted``) after the commit; rows whose
        bytes cannot be removed now stay tombstones. ``dry_run`` only lists them.
        """
        a = self.attachments
        with self._tx(write=not dry_run) as conn:
            orphans = self._orphan_attachments(conn, older_than)
            if dry_run:
                return orphans
            for start in range(0, len(orphans), _CHUNK):
                chunk = orphans[start : start + _CHUNK]
                conn.execute(
                    update(a)
                    .where(tuple_(a.c.owner, a.c.id).in_(chunk))
                    .values(upload_state=DELETED)
                )
        self._attachments_removed(orphans)
        self.retry_attachment_deletes()
        return orphans

    # -- schema: tables and version (sync; start-up, health, CLI) ------------------
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

    # -- export and prune (the CLI) -------------------------------------------------
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
        adapter = item_adapter()
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
                "thread": thread_payload(thread),
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
        tombstones: list[tuple[str, str]] = []
        with self._tx(write=True) as conn:
            by_owner: dict[str, list[str]] = {}
            for owner, thread_id in conn.execute(query.order_by(t.c.created_at, t.c.seq)):
                by_owner.setdefault(owner, []).append(thread_id)
                removed.append(thread_id)
            if dry_run:
                return removed
            for owner, ids in by_owner.items():
                tombstones += self._delete_threads(conn, owner, ids)
        self._attachments_removed(tombstones)
        return removed
