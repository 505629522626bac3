"""The store's schema version: recorded by create_all / init-db, checked before first use.

A database older than the code (a recorded version below SCHEMA_VERSION, a
missing table or column) is a JSON 500 ``misconfigured`` whose log line names
the fix — never a 500 from deep inside a request — and is re-checked until fixed.
Runs on SQLite and PostgreSQL (``store_url``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_chatkit import ChatKit, SQLAlchemyStore
from flask_chatkit.cli import chatkit_cli
from flask_chatkit.storage.version import SCHEMA_VERSION, SchemaOutdated
from flask_chatkit.testing import ChatKitClient

from .word_server import WordServer

LIST = {"type": "threads.list", "params": {}}


@pytest.fixture
def engine(store_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(store_url)
    yield engine
    engine.dispose()


def make_app(store_url: str, create_tables: bool) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="x",
        CHATKIT_LOGIN_REQUIRED=False,
        CHATKIT_DATABASE_URL=store_url,
        CHATKIT_CREATE_TABLES=create_tables,
    )
    ChatKit(app, WordServer)
    return app


def set_version(engine: sa.Engine, version: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE chatkit_schema_version SET version = :v"), {"v": version})


def misconfigured(app: Flask, caplog: pytest.LogCaptureFixture, needle: str) -> None:
    """Two requests: both a JSON 500 ``misconfigured``; one log line naming the fix."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="flask_chatkit"):
        for _ in range(2):
            response = app.test_client().post("/chatkit", json=LIST)
            assert response.status_code == 500
            error = response.get_json()["error"]
            assert error["code"] == "misconfigured"
            assert "Traceback" not in response.get_data(as_text=True)
    lines = [r.getMessage() for r in caplog.records if "misconfigured" in r.getMessage()]
    assert len(lines) == 1, lines
    assert needle in lines[0] and "flask chatkit init-db" in lines[0], lines[0]
    assert not any(r.exc_info for r in caplog.records)


def test_create_all_records_the_version_and_never_lowers_it(store_url: str) -> None:
    store = SQLAlchemyStore(store_url)
    try:
        assert store.schema_version() is None
        store.create_all()
        assert store.schema_version() == SCHEMA_VERSION
        store.check_schema()
        set_version(store.engine, SCHEMA_VERSION + 1)  # written by newer code
        store.create_all()
        assert store.schema_version() == SCHEMA_VERSION + 1
        store.check_schema()
    finally:
        store.close()
        store.engine.dispose()


def test_older_recorded_version_is_a_clear_error_until_init_db(
    store_url: str, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(store_url, create_tables=False)
    store = app.extensions["chatkit"].store
    store.create_all()
    set_version(engine, SCHEMA_VERSION - 1)
    with pytest.raises(SchemaOutdated, match=f"records schema version {SCHEMA_VERSION - 1}"):
        store.check_schema()
    misconfigured(app, caplog, f"this code needs {SCHEMA_VERSION}")

    result = app.test_cli_runner().invoke(chatkit_cli, ["init-db"])
    assert result.exit_code == 0, result.output
    assert f"Schema version: {SCHEMA_VERSION}" in result.output
    # Fixed without a restart: the next request is served.
    assert app.test_client().post("/chatkit", json=LIST).status_code == 200


def test_tables_without_a_version_table_are_older(
    store_url: str, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """A database made before the version table existed."""
    app = make_app(store_url, create_tables=False)
    store = app.extensions["chatkit"].store
    store.create_all()
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE chatkit_schema_version"))
    misconfigured(app, caplog, "table chatkit_schema_version is missing")
    result = app.test_cli_runner().invoke(chatkit_cli, ["init-db"])
    assert result.exit_code == 0, result.output
    assert "Created tables: chatkit_schema_version" in result.output
    kit = ChatKitClient(app.test_client())
    assert kit.list_threads().data == []


def test_a_missing_column_is_caught_at_first_use_even_with_create_tables(
    store_url: str, engine: sa.Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """create_all cannot add a column: the first request says so instead of failing later."""
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE chatkit_threads (seq INTEGER PRIMARY KEY, owner VARCHAR(255), "
                "id VARCHAR(255), payload TEXT)"
            )
        )
    app = make_app(store_url, create_tables=True)
    misconfigured(app, caplog, "column chatkit_threads.created_at is missing")
    assert app.extensions["chatkit"].store.schema_version() is None  # nothing recorded
    result = app.test_cli_runner().invoke(chatkit_cli, ["init-db"])
    assert result.exit_code != 0
    assert "column chatkit_threads.created_at is missing" in result.output
    assert "flask db migrate" in result.output


def test_alembic_owned_schema_without_a_version_row_is_accepted(
    store_url: str, engine: sa.Engine
) -> None:
    """Alembic's migration creates the version table empty: the structure decides."""
    store = SQLAlchemyStore(store_url)
    try:
        store.metadata.create_all(engine)  # what `flask db upgrade` does
        assert store.schema_version() is None
        store.check_schema()
    finally:
        store.close()
        store.engine.dispose()
    app = make_app(store_url, create_tables=False)
    assert app.test_client().post("/chatkit", json=LIST).status_code == 200


def test_init_db_prints_the_version(store_url: str) -> None:
    app = make_app(store_url, create_tables=False)
    result = app.test_cli_runner().invoke(chatkit_cli, ["init-db"])
    assert result.exit_code == 0, result.output
    assert f"Schema version: {SCHEMA_VERSION}" in result.output
    assert app.extensions["chatkit"].store.schema_version() == SCHEMA_VERSION
