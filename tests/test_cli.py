"""The ``flask chatkit`` commands, on a minimal Flask app (no ChatKit extension needed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from chatkit.types import (
    AssistantMessageContent,
    AssistantMessageItem,
    FileAttachment,
    ThreadMetadata,
)
from flask import Flask
from flask.testing import FlaskCliRunner

from flask_chatkit.cli import chatkit_cli
from flask_chatkit.storage.sql import SQLAlchemyStore

ALICE = SimpleNamespace(user_id="alice")
BOB = SimpleNamespace(user_id="bob")
NOW = datetime.now()


def days_ago(n: float) -> datetime:
    return NOW - timedelta(days=n)


def message(tid: str, iid: str, at: datetime) -> AssistantMessageItem:
    return AssistantMessageItem(
        id=iid, thread_id=tid, created_at=at, content=[AssistantMessageContent(text=iid)]
    )


@pytest.fixture
def store(store_url: str) -> Iterator[SQLAlchemyStore]:
    s = SQLAlchemyStore(store_url)
    yield s
    s.close()
    s.engine.dispose()


@pytest.fixture
def runner(store: SQLAlchemyStore) -> FlaskCliRunner:
    app = Flask(__name__)
    app.extensions["chatkit"] = SimpleNamespace(store=store)
    return app.test_cli_runner()


def test_init_db_creates_tables_and_is_idempotent(
    store: SQLAlchemyStore, runner: FlaskCliRunner
) -> None:
    result = runner.invoke(chatkit_cli, ["init-db"])
    assert result.exit_code == 0, result.output
    assert "Created tables: chatkit_threads, chatkit_items, chatkit_attachments" in result.output
    tables = set(sa.inspect(store.engine).get_table_names())
    assert {"chatkit_threads", "chatkit_items", "chatkit_attachments"} <= tables
    again = runner.invoke(chatkit_cli, ["init-db"])
    assert again.exit_code == 0, again.output
    assert "Created tables" not in again.output and "Already present" in again.output


def test_prune_uses_last_activity(store: SQLAlchemyStore, runner: FlaskCliRunner) -> None:
    store.create_all()

    async def seed() -> None:
        await store.save_thread(ThreadMetadata(id="thr_old", created_at=days_ago(30)), ALICE)
        await store.add_thread_item("thr_old", message("thr_old", "m_old", days_ago(20)), ALICE)
        await store.save_attachment(
            FileAttachment(id="atc_old", name="a", mime_type="text/plain", thread_id="thr_old"),
            ALICE,
        )
        await store.save_thread(ThreadMetadata(id="thr_bare", created_at=days_ago(9)), BOB)
        await store.save_thread(ThreadMetadata(id="thr_active", created_at=days_ago(30)), ALICE)
        await store.add_thread_item("thr_active", message("thr_active", "m1", days_ago(29)), ALICE)
        await store.add_thread_item("thr_active", message("thr_active", "m2", days_ago(1)), ALICE)
        await store.save_thread(ThreadMetadata(id="thr_new", created_at=days_ago(2)), BOB)

    asyncio.run(seed())
    result = runner.invoke(chatkit_cli, ["prune", "--older-than", "7"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sorted(lines[:-1]) == ["thr_bare", "thr_old"]
    assert lines[-1].startswith("Removed 2 thread(s)")
    assert [t.id for t, _ in store.iter_owner_threads("alice")] == ["thr_active"]
    assert [t.id for t, _ in store.iter_owner_threads("bob")] == ["thr_new"]
    with store.engine.connect() as conn:
        for table, expected in ((store.items, 2), (store.attachments, 0)):
            count = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
            assert count == expected
    again = runner.invoke(chatkit_cli, ["prune", "--older-than", "7"])
    assert again.output.startswith("Removed 0 thread(s)")
    assert runner.invoke(chatkit_cli, ["prune", "--older-than", "-1"]).exit_code != 0


def test_export_prints_one_owner_as_json_lines(
    store: SQLAlchemyStore, runner: FlaskCliRunner
) -> None:
    store.create_all()
    t1 = ThreadMetadata(id="thr_1", created_at=days_ago(5), title="één")
    t2 = ThreadMetadata(id="thr_2", created_at=days_ago(3))
    items = [message("thr_1", f"m{n}", days_ago(5) + timedelta(minutes=n)) for n in range(3)]

    async def seed() -> None:
        await store.save_thread(t2, ALICE)
        await store.save_thread(t1, ALICE)
        for item in reversed(items):  # inserted newest first; exported oldest first
            await store.add_thread_item("thr_1", item, ALICE)
        await store.save_thread(ThreadMetadata(id="thr_bob", created_at=days_ago(4)), BOB)
        await store.add_thread_item("thr_bob", message("thr_bob", "m_bob", days_ago(4)), BOB)

    asyncio.run(seed())
    result = runner.invoke(chatkit_cli, ["export", "--user", "alice"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert [r["thread"]["id"] for r in records] == ["thr_1", "thr_2"]
    assert records[0]["thread"] == t1.model_dump(mode="json")
    assert records[0]["items"] == [i.model_dump(mode="json") for i in items]
    assert records[1]["items"] == []
    assert "thr_bob" not in result.output and "m_bob" not in result.output
    nobody = runner.invoke(chatkit_cli, ["export", "--user", "nobody"])
    assert nobody.exit_code == 0 and nobody.output == ""


def test_commands_need_a_sqlalchemy_store() -> None:
    app = Flask(__name__)
    app.extensions["chatkit"] = SimpleNamespace(store=object())
    result = app.test_cli_runner().invoke(chatkit_cli, ["export", "--user", "x"])
    assert result.exit_code != 0 and "SQLAlchemyStore" in result.output
    bare = Flask(__name__).test_cli_runner().invoke(chatkit_cli, ["init-db"])
    assert bare.exit_code != 0 and "not initialised" in bare.output
