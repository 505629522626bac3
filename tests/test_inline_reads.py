"""Store reads answered where they arrive: no thread hand-off for threads.list & co.

With the SDK's own ``process()`` and ``SQLAlchemyStore`` on SQLite or PostgreSQL
(psycopg), the view drives ChatKit on the request's own thread (``run_inline``);
everything else, and anything that turns out to need the loop, runs on the loop.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from flask_chatkit.bridge.loop import NeedsLoop, run_inline
from flask_chatkit.storage.sql import SQLAlchemyStore
from flask_chatkit.testing import ChatKitClient

from .apps import create_test_app
from .helpers import created_thread_id, login_as


class _RecordingStore(SQLAlchemyStore):
    """Records the thread each SQL call runs on (the read methods are not overridden)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads_seen: dict[str, set[int]] = {}

    def _tx(self, write: bool = False) -> Any:
        kind = "write" if write else "read"
        self.threads_seen.setdefault(kind, set()).add(threading.get_ident())
        return super()._tx(write)


def _client(store: SQLAlchemyStore, tmp_path: Path) -> ChatKitClient:
    app = create_test_app(store=store, instance_path=str(tmp_path / "instance"))
    return login_as(app, "ann")


def test_reads_run_on_the_request_thread_and_writes_on_the_loop(tmp_path: Path) -> None:
    store = _RecordingStore(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    kit = _client(store, tmp_path)
    assert kit.list_threads().data == []  # the first request also creates the tables
    store.threads_seen.clear()
    events = kit.create_thread("hello words=2")
    thread_id = created_thread_id(events)
    here = threading.get_ident()
    assert here not in store.threads_seen["write"]  # streams write from the store's threads
    store.threads_seen.clear()

    assert [t.id for t in kit.list_threads().data] == [thread_id]
    assert kit.get_thread(thread_id).id == thread_id
    assert len(kit.list_items(thread_id).data) >= 2
    assert store.threads_seen == {"read": {here}}  # every read, and only here


def test_a_foreign_thread_is_still_404_inline(tmp_path: Path) -> None:
    store = SQLAlchemyStore(f"sqlite:///{tmp_path / 'f.sqlite3'}")
    kit = _client(store, tmp_path)
    events = kit.create_thread("mine words=1")
    thread_id = created_thread_id(events)
    app_client = login_as(kit.client, "bob").client
    response = app_client.post(
        "/chatkit", json={"type": "items.list", "params": {"thread_id": thread_id}}
    )
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "not_found"


def test_run_inline_refuses_a_coroutine_that_needs_the_loop() -> None:
    async def reads() -> int:
        return 7

    assert run_inline(reads()) == 7

    async def waits() -> int:
        await asyncio.sleep(0)  # suspends: only a loop can resume it
        return 1

    with pytest.raises(NeedsLoop):
        run_inline(waits())


def test_reads_answer_inline_on_both_databases_but_not_with_an_overridden_read(
    store_url: str, tmp_path: Path
) -> None:
    """Inline where measured faster, SQLite and PostgreSQL (psycopg), and only with the
    store's own read methods."""

    class OverriddenRead(_RecordingStore):
        async def load_threads(self, *args: Any, **kwargs: Any) -> Any:
            return await super().load_threads(*args, **kwargs)

    for store_cls, inline in ((_RecordingStore, True), (OverriddenRead, False)):
        store = store_cls(store_url)
        try:
            kit = _client(store, tmp_path)
            assert [t.id for t in kit.list_threads().data] == []  # creates the tables
            store.threads_seen.clear()
            assert kit.list_threads().data == []
            here = threading.get_ident()
            assert (store.threads_seen["read"] == {here}) is inline, (store_cls, store_url)
        finally:
            store.close()
