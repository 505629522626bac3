"""The store's schema version: recorded in the database, checked before use.

``SCHEMA_VERSION`` is the layout this code needs. ``create_all`` (and so
``flask chatkit init-db`` and ``CHATKIT_CREATE_TABLES``) records it in the
``<prefix>schema_version`` table. ``check`` refuses a database that is older:
a recorded version below ``SCHEMA_VERSION``, or a table or column this code
reads that is missing — the structural check also covers schemas owned by
Alembic, whose migrations create the version table without a row. Imports
nothing of Flask.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, MetaData, Table, insert, inspect, select, update

__all__ = ["SCHEMA_VERSION", "SchemaOutdated", "check", "read_version", "record_version"]

SCHEMA_VERSION = 2
_ROW_ID = 1

# Steps that bring version n-1 to n beyond what ``create_all`` adds (new tables).
# Version 1 added only the version table itself; version 2 the nullable
# attachments columns created_at and upload_state, which create_all adds to
# older tables itself (AttachmentRows._add_attachment_columns).
UPGRADES: dict[int, Callable[[Connection], None]] = {}

FIX = (
    "run `flask chatkit init-db` (creates what is missing and records the version; "
    "SQLAlchemyStore.create_all() does the same), or, when Flask-Migrate/Alembic owns the "
    "schema, `flask db migrate` then `flask db upgrade` with store.metadata in "
    "target_metadata, then `flask chatkit init-db` once to record the version."
)


class SchemaOutdated(RuntimeError):
    """The database's ChatKit schema is older than this code (``problems`` says how)."""

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        self.fix = FIX
        super().__init__(
            f"The ChatKit schema in {where} is older than this flask-chatkit "
            f"(schema version {SCHEMA_VERSION}): {'; '.join(problems)}. Fix: {FIX}"
        )


def read_version(conn: Connection, table: Table) -> int | None:
    """The recorded version, or None (no table, or no row yet)."""
    if not inspect(conn).has_table(table.name):
        return None
    value = conn.execute(select(table.c.version).where(table.c.id == _ROW_ID)).scalar()
    return None if value is None else int(value)


def record_version(conn: Connection, table: Table) -> None:
    """Upgrade an older recorded version and record ``SCHEMA_VERSION`` (run after
    ``create_all`` added the missing tables; never lowers a newer version)."""
    current = read_version(conn, table)
    if current is None:
        conn.execute(insert(table).values(id=_ROW_ID, version=SCHEMA_VERSION))
    elif current < SCHEMA_VERSION:
        for version in range(current + 1, SCHEMA_VERSION + 1):
            step = UPGRADES.get(version)
            if step is not None:
                step(conn)
        conn.execute(update(table).where(table.c.id == _ROW_ID).values(version=SCHEMA_VERSION))


def structure_problems(conn: Connection, metadata: MetaData) -> list[str]:
    """Tables and columns this code uses that the database lacks."""
    inspector = inspect(conn)
    problems: list[str] = []
    for table in metadata.sorted_tables:
        if not inspector.has_table(table.name):
            problems.append(f"table {table.name} is missing")
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        problems += [
            f"column {table.name}.{column.name} is missing"
            for column in table.columns
            if column.name not in present
        ]
    return problems


def check(
    conn: Connection,
    metadata: MetaData,
    version_table: Table,
    where: str,
    *,
    structure_only: bool = False,
) -> None:
    """Raise :class:`SchemaOutdated` unless the database fits this code.

    ``structure_only``: ignore an older recorded version (``create_all`` is about
    to upgrade and record it).
    """
    problems = structure_problems(conn, metadata)
    recorded = None if problems or structure_only else read_version(conn, version_table)
    if recorded is not None and recorded < SCHEMA_VERSION:
        problems.append(f"it records schema version {recorded}, this code needs {SCHEMA_VERSION}")
    if problems:
        raise SchemaOutdated(where, problems)
