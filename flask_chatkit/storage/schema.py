"""Tables, engine set-up and shared SQL for :class:`flask_chatkit.storage.sql.SQLAlchemyStore`.

Imports nothing of Flask. Every table has an autoincrement ``seq`` column: it
breaks ties between rows with the same ``created_at`` so keyset pages never skip
or repeat a row, and the composite indexes below match those keyset queries.
``created_at`` columns hold naive UTC (aware values are converted); the exact
original value, naive or aware, lives in the JSON ``payload``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from chatkit.store import NotFoundError
from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    cast,
    create_engine,
    event,
    func,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import QueuePool, StaticPool

__all__ = [
    "Tables",
    "build_engine",
    "build_tables",
    "db_time",
    "dialect_insert",
    "engine_pool_capacity",
    "insert_new",
    "keyset_page",
    "upsert",
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


def db_time(value: datetime) -> datetime:
    """The sortable column value: naive UTC (naive input is taken as is)."""
    if value.tzinfo is None or value.utcoffset() is None:
        return value.replace(tzinfo=None)
    return value.astimezone(timezone.utc).replace(tzinfo=None)


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


def engine_pool_capacity(engine: Engine) -> int:
    """How many connections the engine can hand out at once (sizes the worker pool)."""
    pool = engine.pool
    if isinstance(pool, StaticPool):
        return 1
    if isinstance(pool, QueuePool):
        overflow = pool._max_overflow  # no public accessor
        size = pool.size()
        return max(1, size + (overflow if overflow > 0 else size))
    return 8


# -- SQL shared by the store's queries ------------------------------------
def dialect_insert(dialect: str, table: Table) -> Any:
    """INSERT with ON CONFLICT support (PostgreSQL, SQLite), else None."""
    if dialect == "postgresql":
        return pg_insert(table)
    if dialect == "sqlite":
        return sqlite_insert(table)
    return None


def upsert(conn: Connection, table: Table, keys: Sequence[str], values: dict[str, Any]) -> None:
    """Insert ``values`` or update the row with the same ``keys``."""
    stmt = dialect_insert(conn.dialect.name, table)
    changed = {k: v for k, v in values.items() if k not in keys}
    if stmt is not None:
        conn.execute(
            stmt.values(**values).on_conflict_do_update(index_elements=list(keys), set_=changed)
        )
        return
    where = and_(*(table.c[k] == values[k] for k in keys))
    if conn.execute(update(table).where(where).values(**changed)).rowcount == 0:
        conn.execute(insert(table).values(**values))


def insert_new(conn: Connection, table: Table, keys: Sequence[str], values: dict[str, Any]) -> bool:
    """Insert ``values`` unless a row with the same ``keys`` exists; False if one did.

    The existing row is left as it is. Racing inserts of one key: exactly one wins.
    """
    stmt = dialect_insert(conn.dialect.name, table)
    if stmt is not None:
        # RETURNING, not rowcount: with implicit RETURNING psycopg reports rowcount -1.
        stmt = stmt.values(**values).on_conflict_do_nothing(index_elements=list(keys))
        return conn.execute(stmt.returning(table.c[keys[-1]])).first() is not None
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
