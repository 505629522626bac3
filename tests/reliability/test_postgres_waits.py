"""On PostgreSQL under gevent, the store's own threads wait for psycopg in C.

With gevent's patches in place psycopg picks a cooperative wait for the whole
process; on the store's native threads that ran a gevent hub per thread for every
query. Those threads use psycopg's C wait instead (``storage/schema.py``), while the
reads the view answers inline, on the request's greenlet, still wait cooperatively.
"""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import requests

from .conftest import create_thread, list_threads, login, serve


def test_store_threads_wait_in_c_and_inline_reads_cooperatively(
    tmp_path: Path, shared_pg_url: str
) -> None:
    with serve(tmp_path, database_url=shared_pg_url, worker_class="gevent") as server:
        session = login(server.url, "ann")
        for n in range(3):  # the writes of each stream run on the store's threads
            create_thread(session, server.url, f"hello {n} words=3")
        assert requests.get(f"{server.url}/_test/hubs", timeout=10).json() == {"other_threads_hubs": 0}

        # A threads.list answered on the request's greenlet, held by a table lock:
        # while it waits, the same worker still answers other requests.
        dsn = shared_pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as lock:
            lock.execute("LOCK TABLE chatkit_threads IN ACCESS EXCLUSIVE MODE")
            listed: list[int] = []
            reader = threading.Thread(
                target=lambda: listed.append(len(list_threads(session, server.url))),
            )
            reader.start()
            reader.join(1.0)
            assert reader.is_alive()  # held by the lock
            probe = requests.get(f"{server.url}/_test/lifecycle", timeout=5)
            assert probe.status_code == 200
            lock.rollback()  # releases the lock
        reader.join(15)
        assert listed == [3]
        assert requests.get(f"{server.url}/_test/hubs", timeout=10).json() == {"other_threads_hubs": 0}
