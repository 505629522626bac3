"""Ids of SQLAlchemyStore: 128 random bits, and an insert never meets an existing row.

The SDK's default ids are 8 hex digits (32 bits): ~1.2 % odds of a clash among 10k
threads of one user, and a clash used to hijack a thread (the new thread's upsert
took over the old one's row and items) or silently drop an item. On SQLite and
PostgreSQL (``store_url``).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar, get_args

import pytest
import sqlalchemy as sa
from chatkit.store import StoreItemType, default_generate_id
from chatkit.types import AssistantMessageContent, AssistantMessageItem, ThreadMetadata

import flask_chatkit.storage.sql as ids
from flask_chatkit.storage.sql import DuplicateIdError, SQLAlchemyStore

from .apps import create_test_app
from .helpers import login_as

T = TypeVar("T")
ALICE = SimpleNamespace(user_id="alice")
BOB = SimpleNamespace(user_id="bob")
T0 = datetime(2024, 5, 1, 12, 0, 0)
CLASH = "c1a5" * 8  # the random part every id gets while a test forces a clash


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def msg(tid: str, iid: str, text: str) -> AssistantMessageItem:
    return AssistantMessageItem(
        id=iid, thread_id=tid, created_at=T0, content=[AssistantMessageContent(text=text)]
    )


def texts(store: SQLAlchemyStore, tid: str, who: Any) -> list[str]:
    page = run(store.load_thread_items(tid, None, 50, "asc", who))
    return [i.content[0].text for i in page.data]  # type: ignore[union-attr]


@pytest.fixture
def store(sql_store: SQLAlchemyStore) -> SQLAlchemyStore:
    return sql_store  # on SQLite and PostgreSQL (tests/pg.py), not conftest's MemoryStore


def test_ids_have_128_random_bits_and_the_sdk_prefixes() -> None:
    store = SQLAlchemyStore("sqlite:///:memory:")
    try:
        thread = ThreadMetadata(id="thr_x", created_at=T0)
        ids = {store.generate_thread_id(ALICE) for _ in range(2000)}
        assert len(ids) == 2000
        assert all(re.fullmatch(r"thr_[0-9a-f]{32}", i) for i in ids), sorted(ids)[:3]
        for kind in get_args(StoreItemType):
            sdk_prefix = default_generate_id(kind).rpartition("_")[0]
            item_id = store.generate_item_id(kind, thread, ALICE)
            assert re.fullmatch(rf"{sdk_prefix}_[0-9a-f]{{32}}", item_id), (kind, item_id)
    finally:
        store.close()


def test_a_new_thread_never_takes_over_an_existing_one(
    store: SQLAlchemyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = f"thr_{CLASH}"
    run(store.save_thread(ThreadMetadata(id=taken, created_at=T0, title="alice's"), ALICE))
    run(store.add_thread_item(taken, msg(taken, "msg_a", "alice's words"), ALICE))
    monkeypatch.setattr(ids, "_random_hex", lambda: CLASH)

    # Created by the SDK's usual save_thread (any host)...
    new_id = store.generate_thread_id(ALICE)
    assert new_id == taken
    with pytest.raises(DuplicateIdError):
        run(store.save_thread(ThreadMetadata(id=new_id, created_at=T0, title="new"), ALICE))

    # ...or as threads.create does it, followed by its first item.
    async def create() -> None:
        tid = store.generate_thread_id(ALICE)
        await store.save_thread(ThreadMetadata(id=tid, created_at=T0), ALICE)
        await store.add_thread_item(tid, msg(tid, "msg_new", "hijacker"), ALICE)

    with pytest.raises(DuplicateIdError):
        run(create())
    assert run(store.load_thread(taken, ALICE)).title == "alice's"
    assert texts(store, taken, ALICE) == ["alice's words"]

    # Another owner's thread with that id is another row: created, and nothing shared.
    async def bob_creates() -> None:
        tid = store.generate_thread_id(BOB)
        await store.save_thread(ThreadMetadata(id=tid, created_at=T0, title="bob's"), BOB)
        await store.add_thread_item(tid, msg(tid, "msg_b", "bob's words"), BOB)

    run(bob_creates())
    assert run(store.load_thread(taken, BOB)).title == "bob's"
    assert texts(store, taken, BOB) == ["bob's words"]
    assert run(store.load_thread(taken, ALICE)).title == "alice's"
    assert texts(store, taken, ALICE) == ["alice's words"]

    # Once created, save_thread updates as always (upsert semantics intact).
    monkeypatch.setattr(ids, "_random_hex", lambda: "0" * 32)
    fresh = store.generate_thread_id(ALICE)
    run(store.save_thread(ThreadMetadata(id=fresh, created_at=T0), ALICE))
    run(store.save_thread(ThreadMetadata(id=fresh, created_at=T0, title="renamed"), ALICE))
    assert run(store.load_thread(fresh, ALICE)).title == "renamed"


def test_adding_an_existing_item_id_is_an_error_and_touches_no_other_row(
    store: SQLAlchemyStore,
) -> None:
    for tid in ("thr_1", "thr_2"):
        run(store.save_thread(ThreadMetadata(id=tid, created_at=T0), ALICE))
    run(store.save_thread(ThreadMetadata(id="thr_1", created_at=T0), BOB))
    run(store.add_thread_item("thr_1", msg("thr_1", "msg_1", "first"), ALICE))
    # The same id in another thread, or in another owner's thread of the same id:
    # separate items, neither one replaces the other.
    run(store.add_thread_item("thr_2", msg("thr_2", "msg_1", "other thread"), ALICE))
    run(store.add_thread_item("thr_1", msg("thr_1", "msg_1", "bob"), BOB))
    with pytest.raises(DuplicateIdError, match="msg_1"):
        run(store.add_thread_item("thr_1", msg("thr_1", "msg_1", "clash"), ALICE))
    assert texts(store, "thr_1", ALICE) == ["first"]
    assert texts(store, "thr_2", ALICE) == ["other thread"]
    assert texts(store, "thr_1", BOB) == ["bob"]
    # save_item still upserts (the SDK's replace/update path).
    run(store.save_item("thr_1", msg("thr_1", "msg_1", "edited"), ALICE))
    assert texts(store, "thr_1", ALICE) == ["edited"]
    assert texts(store, "thr_2", ALICE) == ["other thread"]


class _GeneratesOneIdTwice(SQLAlchemyStore):
    """A store whose every new thread draws the same random id (a forced clash)."""

    first_id: str | None = None

    def generate_thread_id(self, context: Any) -> str:
        drawn, ids._random_hex = ids._random_hex, lambda: CLASH
        try:
            thread_id = super().generate_thread_id(context)
        finally:
            ids._random_hex = drawn
        self.first_id = self.first_id or thread_id
        return thread_id


def test_threads_create_with_a_clashing_id_fails_and_hijacks_nothing(tmp_path: Path) -> None:
    store = _GeneratesOneIdTwice(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    app = create_test_app(store=store, instance_path=str(tmp_path / "instance"))
    client = login_as(app, "ada").client

    def create(text: str) -> Any:
        body = {"type": "threads.create", "params": {"input": {
            "content": [{"type": "input_text", "text": text}],
            "attachments": [], "inference_options": {}}}}
        return client.post("/chatkit", data=json.dumps(body), content_type="application/json")

    mine = create("mine words=1")
    assert mine.status_code == 200 and b"thread.item.done" in mine.get_data()  # read to the end
    tid = store.first_id
    clash = create("hijack words=1")
    assert clash.status_code == 500 and clash.get_json()["error"]["code"] == "internal_error"
    assert tid not in clash.get_data(as_text=True)
    items = client.post("/chatkit", json={"type": "items.list", "params": {
        "thread_id": tid, "order": "asc"}}).get_json()["data"]
    assert [i["type"] for i in items] == ["user_message", "assistant_message"]
    assert items[0]["content"][0]["text"] == "mine words=1"
    listed = client.post("/chatkit", json={"type": "threads.list", "params": {}}).get_json()
    assert [t["id"] for t in listed["data"]] == [tid]


def test_re_adding_an_item_whose_add_was_cancelled_is_no_clash(store: SQLAlchemyStore) -> None:
    """A cancel lands while an item is being written: the write still commits in its
    worker thread, and ChatKit's handle_stream_cancelled adds its pending copy of
    the same item. That must not fail (it would lose the "stream cancelled" note)."""
    run(store.save_thread(ThreadMetadata(id="thr_1", created_at=T0), ALICE))
    inserting, release = threading.Event(), threading.Event()

    def held_item_insert(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        # The first item insert waits (bounded) until the test has cancelled its caller.
        if statement.lstrip().upper().startswith("INSERT INTO CHATKIT_ITEMS") and (
            not inserting.is_set()
        ):
            inserting.set()
            release.wait(10)

    sa.event.listen(store.engine, "before_cursor_execute", held_item_insert)

    async def until(predicate: Any, what: str) -> None:
        deadline = time.monotonic() + 10
        while not await predicate():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async def stored() -> bool:
        page = await store.load_thread_items("thr_1", None, 10, "asc", ALICE)
        return len(page.data) == 1

    async def go() -> None:
        done = msg("thr_1", "msg_1", "final")
        task = asyncio.create_task(store.add_thread_item("thr_1", done, ALICE))
        await until(lambda: asyncio.sleep(0, inserting.is_set()), "the insert never started")
        task.cancel()  # while the insert is in flight in its worker thread
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await until(stored, "the cancelled caller's insert never committed")
        # ChatKit's handle_stream_cancelled now adds its pending copy of the same item.
        await store.add_thread_item("thr_1", msg("thr_1", "msg_1", "partial"), ALICE)
        with pytest.raises(DuplicateIdError):  # any further add of that id is a clash
            await store.add_thread_item("thr_1", msg("thr_1", "msg_1", "again"), ALICE)

    try:
        run(go())
    finally:
        release.set()
        sa.event.remove(store.engine, "before_cursor_execute", held_item_insert)
    assert len(texts(store, "thr_1", ALICE)) == 1
