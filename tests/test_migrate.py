"""Flask-Migrate / Alembic owns the schema: autogenerate sees the ChatKit tables.

Runs the real ``flask db init / migrate / upgrade`` commands (Flask's CLI runner,
in-process: a subprocess per command costs seconds of imports) on
``tests/migrate_app.py`` (its own model + the ChatKit store on ``db.engine``),
with ``migrations/env.py`` edited as the README says, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_chatkit.storage.version import SCHEMA_VERSION
from flask_chatkit.testing import ChatKitClient

from .migrate_app import create_app

CHATKIT_TABLES = {
    "chatkit_threads",
    "chatkit_items",
    "chatkit_attachments",
    "chatkit_schema_version",
}

# The README's env.py edit: hand Alembic the app's metadata and the store's.
ENV_ORIGINAL = "        return target_db.metadatas[None]\n"
ENV_EDITED = (
    "        return [\n"
    "            target_db.metadatas[None],\n"
    "            current_app.extensions['chatkit'].store.metadata,\n"
    "        ]\n"
)


@pytest.fixture
def app(store_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    monkeypatch.setenv("MIGRATE_APP_DATABASE_URL", store_url)
    # Alembic's env.py runs logging.config.fileConfig, which disables every
    # logger that exists: give them back so later tests still see their logs.
    enabled = [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and not logger.disabled
    ]
    app = create_app()
    yield app
    for logger in enabled:
        logger.disabled = False


def flask(app: Flask, *args: str) -> str:
    """``flask <args>`` through Flask's CLI runner (the real click commands, in-process)."""
    result = app.test_cli_runner().invoke(args=list(args))
    assert result.exit_code == 0, f"flask {' '.join(args)}\n{result.output}\n{result.exception!r}"
    return result.output


def test_autogenerate_and_upgrade_create_the_chatkit_tables(
    app: Flask, store_url: str, tmp_path: Path
) -> None:
    migrations = tmp_path / "migrations"
    flask(app, "db", "init", "-d", str(migrations))
    env_py = migrations / "env.py"
    source = env_py.read_text()
    assert ENV_ORIGINAL in source
    env_py.write_text(source.replace(ENV_ORIGINAL, ENV_EDITED))

    flask(app, "db", "migrate", "-d", str(migrations), "-m", "app and chatkit")
    (script,) = (migrations / "versions").glob("*.py")
    generated = script.read_text()
    for table in {"notes", *CHATKIT_TABLES}:
        assert f"op.create_table('{table}'" in generated, (table, generated)
    assert "ix_chatkit_items_thread_created" in generated

    engine = sa.create_engine(store_url)
    try:
        assert not CHATKIT_TABLES & set(sa.inspect(engine).get_table_names())
        flask(app, "db", "upgrade", "-d", str(migrations))
        tables = set(sa.inspect(engine).get_table_names())
        assert {"notes", "alembic_version", *CHATKIT_TABLES} <= tables

        # A second autogenerate finds nothing to do (Flask-Migrate writes no empty
        # revision): the migrated database and the store's metadata agree.
        flask(app, "db", "migrate", "-d", str(migrations), "-m", "noop")
        assert [script] == list((migrations / "versions").glob("*.py"))

        # Alembic made the tables; init-db creates nothing and records the version.
        out = flask(app, "chatkit", "init-db")
        assert "Created tables" not in out and f"Schema version: {SCHEMA_VERSION}" in out
        with engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version FROM chatkit_schema_version")).scalar()
        assert version == SCHEMA_VERSION
    finally:
        engine.dispose()

    # The app serves chats on the migrated schema (CHATKIT_CREATE_TABLES is False).
    kit = ChatKitClient(app.test_client())
    kit.create_thread("hello words=2")
    assert len(kit.list_threads().data) == 1
