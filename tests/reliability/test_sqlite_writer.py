"""On a SQLite file under gevent, the group writer runs on the loop, never blocking the hub.

With the loop a greenlet on the hub, the store's group commits run on the loop itself
instead of a writer thread (``storage/sql.py``, ``_GroupWriter.run_on_loop``). Its
connection never sleeps in SQLite's busy handler: a database locked by another process
is waited for with the loop's timers, while the worker serves everyone else. Its commits
do not checkpoint the WAL; a reader thread does, at most once a second.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import requests

from .conftest import create_thread, list_items, list_threads, login, serve


def _probe(url: str) -> dict[str, Any]:
    response = requests.get(f"{url}/_test/hubs", timeout=10)
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def test_group_commits_on_the_loop_wait_for_a_lock_without_blocking_the_worker(
    tmp_path: Path,
) -> None:
    db = tmp_path / "chatkit.db"
    with serve(tmp_path, database_url=f"sqlite:///{db}", worker_class="gevent") as server:
        session = login(server.url, "ann")
        first, _ = create_thread(session, server.url, "first words=3")
        items = list_items(session, server.url, first)
        assert [i["type"] for i in items] == ["user_message", "assistant_message"]
        assert _probe(server.url)["writer_thread"] is False  # the loop committed them

        # Another process holds SQLite's write lock: the stream's first write waits
        # for it, and the worker answers other requests meanwhile.
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            created: list[Any] = []
            client = threading.Thread(
                target=lambda: created.append(create_thread(session, server.url, "held words=3"))
            )
            client.start()
            client.join(1.5)
            assert client.is_alive()  # waiting for the lock
            started = time.monotonic()
            probe = requests.get(f"{server.url}/_test/lifecycle", timeout=5)
            assert probe.status_code == 200
            assert time.monotonic() - started < 2.0
        finally:
            other.execute("ROLLBACK")
            other.close()
        client.join(15)
        assert not client.is_alive()
        held_id, events = created[0]
        assert any(e.get("type") == "thread.created" for e in events)
        assert {t["id"] for t in list_threads(session, server.url)} == {first, held_id}
        assert _probe(server.url)["writer_thread"] is False


def test_the_wal_is_checkpointed_off_the_loop(tmp_path: Path) -> None:
    db = tmp_path / "chatkit.db"
    with serve(tmp_path, database_url=f"sqlite:///{db}", worker_class="gevent") as server:
        session = login(server.url, "bob")
        first, _ = create_thread(session, server.url, "first words=3")
        time.sleep(1.2)  # checkpoints run at most once a second, after a commit
        create_thread(session, server.url, "second words=3")

        # The database file alone, without its WAL, holds the first thread: a
        # checkpoint copied it there while the server ran.
        def in_main_file() -> bool:
            copy = tmp_path / "main-only.db"
            copy.write_bytes(db.read_bytes())
            conn = sqlite3.connect(copy)
            try:
                names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
                table = next(n for n in names if n.endswith("threads"))
                query = f"SELECT count(*) FROM {table} WHERE id = ?"
                return conn.execute(query, (first,)).fetchone()[0] == 1
            except StopIteration:
                return False
            finally:
                conn.close()

        deadline = time.monotonic() + 10
        while not in_main_file():
            assert time.monotonic() < deadline, "the WAL was never checkpointed"
            time.sleep(0.2)
