"""SIGKILL the gunicorn worker mid-stream on SQLite: gunicorn recovers, data is intact.

Fails when: gunicorn does not replace the worker (no new pid / no answer), the
new worker cannot open the SQLite database the killed one had open (WAL not
recovered, a stale lock: "database is locked"), a committed thread or item is
lost or altered, the killed stream's thread (already committed with its user
message before the first delta) is unreadable, or the database file is corrupt.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from .conftest import (
    StreamReader,
    add_message_payload,
    cookie_of,
    create_payload,
    create_thread,
    list_items,
    list_threads,
    login,
    post,
    raw_request,
    serve,
    wait_until,
)


def _serving(url: str) -> bool:
    try:
        return requests.get(f"{url}/_test/observations", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.timeout(120)
def test_sigkill_mid_stream_on_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "kill.sqlite3"
    with serve(tmp_path, database_url=f"sqlite:///{db}") as server:
        session = login(server.url, "killer")
        done = [create_thread(session, server.url, f"words={n}")[0] for n in range(1, 6)]
        before = {t: list_items(session, server.url, t) for t in done}
        assert all([i["type"] for i in items] == ["user_message", "assistant_message"]
                   for items in before.values())

        (old_pid,) = server.worker_pids()
        payload = create_payload("words=200 delay=0.05")
        sock = raw_request(server.port, cookie_of(session), payload, timeout=20)
        reader = StreamReader(sock)
        assert reader.read_headers() == 200
        while reader.deltas().count(" ") < 5:
            assert reader.next_event() is not None
        killed_thread = reader.thread_id()
        assert killed_thread

        os.kill(old_pid, signal.SIGKILL)
        # The client learns at once that the stream is gone (EOF or reset, no hang).
        started = time.monotonic()
        try:
            while reader.next_event() is not None:
                assert time.monotonic() - started < 10
        except ConnectionError:
            pass
        finally:
            sock.close()
        assert time.monotonic() - started < 10

        # gunicorn boots a replacement worker, which serves.
        assert wait_until(lambda: [p for p in server.worker_pids() if p != old_pid] != [], 30)
        assert wait_until(lambda: _serving(server.url), 30)
        (new_pid,) = server.worker_pids()
        assert new_pid != old_pid

        # Completed threads intact (the same session cookie still works).
        after = {t: list_items(session, server.url, t) for t in done}
        assert after == before
        # The killed stream's thread is readable, with its user message.
        response = post(session, server.url, {"type": "threads.get_by_id",
                                              "params": {"thread_id": killed_thread}})
        assert response.status_code == 200, response.text
        thread = response.json()
        assert thread["id"] == killed_thread
        items = thread["items"]["data"]
        assert items and items[0]["type"] == "user_message"
        assert items[0]["content"][0]["text"] == "words=200 delay=0.05"
        # New requests work, including continuing the interrupted thread.
        create_thread(session, server.url, "words=3")
        response = post(session, server.url, add_message_payload(killed_thread, "words=2"))
        assert response.status_code == 200, response.text
        ids = {t["id"] for t in list_threads(session, server.url)}
        assert set(done) | {killed_thread} <= ids and len(ids) == 7

        log = server.log()
        assert "database is locked" not in log
        assert "Traceback" not in log.split(f"pid: {new_pid}")[-1]

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
