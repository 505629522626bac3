"""Schema and bulk work of ``SQLAlchemyStore``: create, check, export, prune.

Sync methods for start-up, the health route and the CLI (not part of chatkit's
Store). Imports nothing of Flask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from chatkit.types import ThreadItem, ThreadMetadata
from sqlalchemy import Connection, Engine, MetaData, Table, exists, inspect, select
from sqlalchemy.exc import DBAPIError

from .payloads import item_adapter, thread_payload
from .schema import db_time
from .version import check as check_version
from .version import read_version, record_version


class Maintenance:
    """Mixed into ``SQLAlchemyStore``: tables, schema version, export and prune."""

    engine: Engine
    metadata: MetaData
    threads: Table
    items: Table
    schema_version_table: Table

    if TYPE_CHECKING:

        def _tx(self, write: bool = False) -> AbstractContextManager[Connection]: ...

        def _add_attachment_columns(self, conn: Connection) -> None: ...

        def _delete_threads(
            self, conn: Connection, owner: str, ids: Sequence[str]
        ) -> list[str]: ...

        def _attachments_removed(self, attachment_ids: list[str]) -> None: ...

    # -- schema -----------------------------------------------------------------
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
