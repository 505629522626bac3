"""Tables and engine set-up for :class:`flask_chatkit.storage.sql.SQLAlchemyStore`.

Imports nothing of Flask. Every table has an autoincrement ``seq`` column: it
breaks ties between rows with the same ``created_at`` so keyset pages never skip
or repeat a row, and the composite indexes below match those keyset queries.
``created_at`` columns hold naive UTC (aware values are converted); the exact
original value, naive or aware, lives in the JSON ``payload``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import QueuePool, StaticPool

from ..bridge.native import gevent_patched, native_thread_local

__all__ = [
    "Tables",
    "build_engine",
    "build_tables",
    "engine_pool_capacity",
    "psycopg_waits_natively_here",
]

SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 5
SQLITE_POOL_SIZE = 4

# SQLite only gives INTEGER PRIMARY KEY columns rowid autoincrement semantics.
_SEQ = BigInteger().with_variant(Integer(), "sqlite")
_JSON = JSON(none_as_null=True)


@dataclass(frozen=True)
class Tables:
    metadata: MetaData
    threads: Table
    items: Table
    attachments: Table
    schema_version: Table


def build_tables(prefix: str = "chatkit_") -> Tables:
    metadata = MetaData()
    threads = Table(
        f"{prefix}threads",
        metadata,
        Column("seq", _SEQ, primary_key=True, autoincrement=True),
        Column("owner", String(255), nullable=False),
        Column("id", String(255), nullable=False),
        Column("created_at", DateTime(), nullable=False),
        Column("payload", _JSON, nullable=False),
        UniqueConstraint("owner", "id", name=f"uq_{prefix}threads_owner_id"),
        Index(f"ix_{prefix}threads_owner_created", "owner", "created_at", "seq"),
    )
    items = Table(
        f"{prefix}items",
        metadata,
        Column("seq", _SEQ, primary_key=True, autoincrement=True),
        Column("owner", String(255), nullable=False),
        Column("thread_id", String(255), nullable=False),
        Column("id", String(255), nullable=False),
        Column("created_at", DateTime(), nullable=False),
        Column("payload", _JSON, nullable=False),
        UniqueConstraint("owner", "thread_id", "id", name=f"uq_{prefix}items_owner_thread_id"),
        Index(f"ix_{prefix}items_thread_created", "thread_id", "created_at", "seq"),
    )
    attachments = Table(
        f"{prefix}attachments",
        metadata,
        Column("seq", _SEQ, primary_key=True, autoincrement=True),
        Column("owner", String(255), nullable=False),
        Column("id", String(255), nullable=False),
        Column("thread_id", String(255), nullable=True),
        Column("payload", _JSON, nullable=False),
        # Upload claims and orphan pruning (see attachment_rows.py); nullable so
        # tables made before they existed can gain them with a plain ADD COLUMN.
        Column("created_at", DateTime(), nullable=True),
        Column("upload_state", String(16), nullable=True),
        UniqueConstraint("owner", "id", name=f"uq_{prefix}attachments_owner_id"),
        Index(f"ix_{prefix}attachments_owner_thread", "owner", "thread_id"),
    )
    # One row (id 1): the schema version this database was brought to (storage/version.py).
    schema_version = Table(
        f"{prefix}schema_version",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("version", Integer, nullable=False),
    )
    return Tables(metadata, threads, items, attachments, schema_version)


def is_sqlite_memory(url: URL) -> bool:
    database = url.database or ""
    return (
        database in ("", ":memory:")
        or database.startswith("file::memory:")
        or url.query.get("mode") == "memory"
    )


def _sqlite_on_connect(wal: bool) -> Any:
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let the store issue BEGIN / BEGIN IMMEDIATE itself (pysqlite's implicit
        # deferred BEGIN would let two writers deadlock into "database is locked").
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            if wal:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    return on_connect


def build_engine(url_or_str: str | URL, pool_size: int | None = None) -> Engine:
    """An engine configured for the store: SQLite WAL/busy timeout, PG pre-ping and fast fail."""
    url = make_url(url_or_str)
    backend = url.get_backend_name()
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
        backend = "postgresql"
    if backend == "sqlite":
        if is_sqlite_memory(url):
            engine = create_engine(
                url,
                poolclass=StaticPool,
                connect_args={"check_same_thread": False},
            )
            event.listen(engine, "connect", _sqlite_on_connect(wal=False))
            return engine
        # No overflow: the store runs one worker thread per pooled connection,
        # so connections are never opened and closed per request (each SQLite
        # connect runs its PRAGMAs), and a small pool keeps GIL hand-offs few.
        engine = create_engine(
            url,
            poolclass=QueuePool,
            pool_size=pool_size or SQLITE_POOL_SIZE,
            max_overflow=0,
            connect_args={
                "check_same_thread": False,
                "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            },
        )
        event.listen(engine, "connect", _sqlite_on_connect(wal=True))
        return engine
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,
        "pool_size": pool_size or 10,
        "max_overflow": 0,
    }
    if backend == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return create_engine(url, **kwargs)


# -- psycopg's waits on the store's native threads ------------------------------------
# psycopg picks one wait function per process when it is imported: with gevent's
# patches in place, a cooperative one (gevent's ``poll``), so that a query on a
# greenlet lets the others run. The store's own threads are native threads, though:
# there, gevent's ``poll`` runs a gevent hub per thread for every wait, where
# psycopg's C wait would simply block that thread with the GIL released (figures:
# ``docs/benchmarks.md``). ``PSYCOPG_WAIT_FUNC`` can only choose for the whole
# process, and the request's greenlets (inline reads) need the cooperative wait: so
# the choice is made per thread, for the threads that asked for it.
_waits_natively = native_thread_local()


def psycopg_waits_natively_here() -> None:
    """Let psycopg wait in C on the calling native thread (a store worker's start).

    Does nothing unless psycopg chose a cooperative wait (gevent patched ``select``
    before psycopg was imported) and has its C wait (psycopg-binary or psycopg-c).
    """
    try:
        from psycopg import waiting
    except ImportError:
        return
    wait_c = getattr(waiting, "wait_c", None)
    if wait_c is None or waiting.wait is wait_c:
        return
    if not getattr(waiting.wait, "_chatkit_per_thread", False):
        waiting.wait = _per_thread(native=wait_c, cooperative=waiting.wait)
    if not getattr(waiting.wait_conn, "_chatkit_per_thread", False):
        # Connecting waits through ``wait_conn``, a loop over the ``DefaultSelector``
        # psycopg imported (gevent's): the same, on the selector gevent replaced.
        cooperative_conn = waiting.wait_conn
        waiting.wait_conn = _per_thread(
            native=_with_native_selector(cooperative_conn), cooperative=cooperative_conn
        )
    _waits_natively.here = True


def _per_thread(native: Callable[..., Any], cooperative: Callable[..., Any]) -> Callable[..., Any]:
    """A wait that is ``native`` on threads that asked for it, else ``cooperative``."""

    def wait(*args: Any, **kwargs: Any) -> Any:
        if getattr(_waits_natively, "here", False):
            return native(*args, **kwargs)
        return cooperative(*args, **kwargs)

    wait._chatkit_per_thread = True  # type: ignore[attr-defined]
    return wait


def _with_native_selector(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` (a function of ``psycopg.waiting``) seeing the selector gevent replaced."""
    from gevent import monkey

    original = monkey.get_original("selectors", "DefaultSelector")
    if fn.__globals__.get("DefaultSelector", original) is original:
        return fn
    names = {**fn.__globals__, "DefaultSelector": original}
    native = types.FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    native.__kwdefaults__ = fn.__kwdefaults__
    return native


def psycopg_waits_cooperatively() -> bool:
    """Whether psycopg waits through gevent on a thread that did not ask for C waits.

    True when gevent patched ``select`` before psycopg was imported (gunicorn's
    gevent worker patches first), unless ``PSYCOPG_WAIT_FUNC`` chose the C wait.
    """
    try:
        from psycopg import waiting
    except ImportError:
        return False
    wait = waiting.wait
    if getattr(wait, "_chatkit_per_thread", False):
        return True  # only ever installed over a cooperative wait
    return wait is not getattr(waiting, "wait_c", None) and gevent_patched()


def engine_pool_capacity(engine: Engine) -> int:
    """How many connections the engine can hand out at once (sizes the worker pool)."""
    pool = engine.pool
    if isinstance(pool, StaticPool):
        return 1
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow  # no public accessor
        size = pool.size()
        # max_overflow=0 adds nothing; a negative one is unbounded: allow size more.
        return max(1, size + (overflow if overflow >= 0 else size))
    return 8
