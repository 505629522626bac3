"""SQLite group commit: writes that arrive together share one transaction and one COMMIT,
each await still returns only after the COMMIT that holds its own write."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from chatkit.types import AssistantMessageContent, AssistantMessageItem, ThreadMetadata
from sqlalchemy import event

from flask_chatkit.storage.sql import DuplicateIdError, SQLAlchemyStore, _writes

ALICE = SimpleNamespace(user_id="alice")
T0 = datetime(2024, 5, 1, 12, 0, 0)
WRITES = 200


@pytest.fixture
def store(tmp_path: Path) -> Any:
    store = SQLAlchemyStore(f"sqlite:///{tmp_path / 'g.sqlite3'}")
    store.create_all()
    yield store
    store.close()
    store.engine.dispose()


def _commits(store: SQLAlchemyStore) -> list[int]:
    counted: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: counted.append(1))
    return counted


def _stored_ids(store: SQLAlchemyStore) -> set[str]:
    # A connection of its own, outside SQLAlchemy: only committed rows are visible.
    path = store.engine.url.database
    assert path is not None
    with sqlite3.connect(path) as raw:
        return {row[0] for row in raw.execute("SELECT id FROM chatkit_threads")}


def _message(thread_id: str, item_id: str) -> AssistantMessageItem:
    return AssistantMessageItem(
        id=item_id, thread_id=thread_id, created_at=T0,
        content=[AssistantMessageContent(text=item_id)],
    )  # fmt: skip


def test_writes_that_arrive_together_share_commits_and_each_is_committed_on_return(
    store: SQLAlchemyStore,
) -> None:
    commits = _commits(store)

    async def save(n: int) -> None:
        await store.save_thread(ThreadMetadata(id=f"thr_{n}", created_at=T0), ALICE)
        assert f"thr_{n}" in _stored_ids(store)  # committed before the await returned

    async def main() -> None:
        await asyncio.gather(*(save(n) for n in range(WRITES)))

    asyncio.run(main())
    assert _stored_ids(store) == {f"thr_{n}" for n in range(WRITES)}
    # Writes queued behind one another were grouped (one commit each would be WRITES).
    assert len(commits) <= WRITES // 2, len(commits)


def test_a_failing_write_fails_alone(store: SQLAlchemyStore) -> None:
    asyncio.run(store.save_thread(ThreadMetadata(id="thr_1", created_at=T0), ALICE))
    asyncio.run(store.add_thread_item("thr_1", _message("thr_1", "msg_taken"), ALICE))

    async def main() -> list[Any]:
        adds = [store.add_thread_item("thr_1", _message("thr_1", f"msg_{n}"), ALICE)
                for n in range(20)]  # fmt: skip
        adds.insert(10, store.add_thread_item("thr_1", _message("thr_1", "msg_taken"), ALICE))
        return await asyncio.gather(*adds, return_exceptions=True)

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and isinstance(failures[0], DuplicateIdError)
    page = asyncio.run(store.load_thread_items("thr_1", None, 50, "asc", ALICE))
    assert sorted(i.id for i in page.data) == sorted(
        ["msg_taken", *(f"msg_{n}" for n in range(20))]
    )


def test_a_write_that_fails_halfway_leaves_none_of_its_rows(store: SQLAlchemyStore) -> None:
    """A write that stored a row and then failed is rolled back to its own savepoint:
    its row is gone, the writes before and after it in the group are committed."""

    @_writes
    def thread_then_failure(thread: ThreadMetadata) -> None:
        with store._tx(write=True) as conn:
            store._insert_thread(conn, "alice", thread)
            conn.exec_driver_sql("SELECT no_such_column FROM chatkit_threads")

    async def main() -> list[Any]:
        saves: list[Any] = [store.save_thread(ThreadMetadata(id=f"thr_{n}", created_at=T0), ALICE)
                            for n in range(20)]  # fmt: skip
        saves.insert(10, store._run(thread_then_failure, ThreadMetadata(id="thr_x", created_at=T0)))
        return await asyncio.gather(*saves, return_exceptions=True)

    results = asyncio.run(main())
    failures = [r for r in results if isinstance(r, BaseException)]
    assert len(failures) == 1 and "no_such_column" in str(failures[0]), failures
    assert _stored_ids(store) == {f"thr_{n}" for n in range(20)}
    # The group's connection is usable afterwards: the next group commits.
    asyncio.run(store.save_thread(ThreadMetadata(id="thr_after", created_at=T0), ALICE))
    assert "thr_after" in _stored_ids(store)


def test_a_failed_commit_fails_every_write_of_its_group(store: SQLAlchemyStore) -> None:
    refused: list[int] = []

    def refuse_first_commit(_conn: Any) -> None:
        if not refused:
            refused.append(1)
            raise sqlite3.OperationalError("disk I/O error")

    event.listen(store.engine, "commit", refuse_first_commit)

    async def main() -> list[Any]:
        saves = [store.save_thread(ThreadMetadata(id=f"thr_{n}", created_at=T0), ALICE)
                 for n in range(30)]  # fmt: skip
        return await asyncio.gather(*saves, return_exceptions=True)

    results = asyncio.run(main())
    failed = {f"thr_{n}" for n, r in enumerate(results) if isinstance(r, BaseException)}
    assert failed, "the refused commit failed no write"
    # Exactly the writes that were told they failed are missing; the others are stored.
    assert _stored_ids(store) == {f"thr_{n}" for n in range(30)} - failed


def test_a_slow_blob_delete_after_a_commit_holds_up_no_other_write(store: SQLAlchemyStore) -> None:
    """Deleting a thread's files (S3 slow or down) runs beside the writer, not on it."""
    from chatkit.types import FileAttachment

    entered, release = threading.Event(), threading.Event()
    deleted: list[list[str]] = []

    def slow_storage(ids: list[str]) -> None:
        entered.set()
        release.wait(30)  # bounded: a broken store fails the asserts below, never hangs
        deleted.append(ids)

    store.on_attachments_deleted = slow_storage

    async def main() -> None:
        await store.save_thread(ThreadMetadata(id="thr_gone", created_at=T0), ALICE)
        await store.save_attachment(FileAttachment(
            id="atc_1", name="a.txt", mime_type="text/plain", thread_id="thr_gone"), ALICE)
        deleting = asyncio.ensure_future(store.delete_thread("thr_gone", ALICE))
        assert await asyncio.to_thread(entered.wait, 30), "the blob delete never started"
        # The storage is still busy: another write commits meanwhile ...
        await asyncio.wait_for(
            store.save_thread(ThreadMetadata(id="thr_new", created_at=T0), ALICE), 10)
        assert "thr_new" in _stored_ids(store)
        assert not deleting.done()  # ... and the delete's caller still waits for its files
        release.set()
        await asyncio.wait_for(deleting, 10)
        assert deleted == [["atc_1"]]

    try:
        asyncio.run(main())
    finally:
        release.set()
