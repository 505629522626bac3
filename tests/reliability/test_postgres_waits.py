"""On PostgreSQL under gevent, store calls never block the worker's hub.

With the loop on the hub (the default), the store's calls made from the loop run as
greenlets on the hub, like the reads the view answers inline: psycopg waits
cooperatively there, and no native thread is involved (``storage/sql.py``,
``SQLAlchemyStore._hub_for``). With ``CHATKIT_LOOP = "thread"`` they run on the
store's native threads, which wait for psycopg in C (``storage/schema.py``): with
gevent's patches in place psycopg's own choice for the whole process would run a
gevent hub per native thread for every query.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg
import requests

from .conftest import create_thread, list_threads, login, serve

# No store thread started, no gevent hub on any other thread.
ON_THE_HUB = {"other_threads_hubs": 0, "store_threads": 0, "writer_thread": None}


def _probe(url: str) -> dict[str, Any]:
    response = requests.get(f"{url}/_test/hubs", timeout=10)
    assert response.status_code == 200
    return response.json()  # type: ignore[no-any-return]


def _held_by_lock(dsn: str, url: str, work: Any) -> list[Any]:
    """Run ``work()`` in a client thread while a lock holds the threads table: it must
    wait, and the worker must still answer another request meanwhile."""
    done: list[Any] = []
    with psycopg.connect(dsn) as lock:
        lock.execute("LOCK TABLE chatkit_threads IN ACCESS EXCLUSIVE MODE")
        client = threading.Thread(target=lambda: done.append(work()))
        client.start()
        client.join(1.0)
        assert client.is_alive()  # held by the lock
        probe = requests.get(f"{url}/_test/lifecycle", timeout=5)
        assert probe.status_code == 200
        lock.rollback()  # releases the lock
    client.join(15)
    assert not client.is_alive()
    return done


def _serve_gevent(tmp_path: Path, pg_url: str, **env: str) -> Any:
    return serve(tmp_path, database_url=pg_url, worker_class="gevent", env=env)


def test_store_calls_run_on_the_hub_and_wait_cooperatively(
    tmp_path: Path, shared_pg_url: str
) -> None:
    dsn = shared_pg_url.replace("postgresql+psycopg://", "postgresql://")
    with _serve_gevent(tmp_path, shared_pg_url) as server:
        session = login(server.url, "ann")
        for n in range(3):
            create_thread(session, server.url, f"hello {n} words=3")
        # Every store call of those streams ran on the hub: no native thread started.
        assert _probe(server.url) == ON_THE_HUB

        # A stream whose first write (the new thread) waits for the lock, on a
        # greenlet of the hub: the worker answers other requests meanwhile.
        created = _held_by_lock(
            dsn, server.url, lambda: create_thread(session, server.url, "held words=3")
        )
        thread_id, events = created[0]
        assert any(e.get("type") == "thread.created" for e in events)
        assert events[-1].get("type") == "thread.item.done", events[-1]

        # A threads.list answered on the request's greenlet, held the same way.
        listed = _held_by_lock(dsn, server.url, lambda: list_threads(session, server.url))
        assert thread_id in {t["id"] for t in listed[0]}
        assert len(listed[0]) == 4
        assert _probe(server.url) == ON_THE_HUB


def test_with_the_loop_on_a_thread_store_threads_wait_in_c(
    tmp_path: Path, shared_pg_url: str
) -> None:
    with _serve_gevent(tmp_path, shared_pg_url, CHATKIT_LOOP="thread") as server:
        session = login(server.url, "bob")
        # At once, so that the engine's pool connects from several store threads
        # (connecting waits too, through psycopg's wait_conn).
        clients = [
            threading.Thread(target=create_thread, args=(session, server.url, f"hello {n} words=3"))
            for n in range(8)
        ]
        for client in clients:
            client.start()
        for client in clients:
            client.join(30)
        assert len(list_threads(session, server.url)) == 8
        probe = _probe(server.url)
        assert probe["store_threads"] >= 1
        assert probe["other_threads_hubs"] == 0


def test_a_blocking_psycopg_wait_keeps_store_calls_off_the_hub(
    tmp_path: Path, shared_pg_url: str
) -> None:
    # PSYCOPG_WAIT_FUNC=wait_c: psycopg's waits block the native thread, so the
    # loop's store calls must go to the store's threads, never to the hub.
    dsn = shared_pg_url.replace("postgresql+psycopg://", "postgresql://")
    with _serve_gevent(tmp_path, shared_pg_url, PSYCOPG_WAIT_FUNC="wait_c") as server:
        session = login(server.url, "cid")
        create_thread(session, server.url, "first words=3")  # creates the tables
        created = _held_by_lock(
            dsn, server.url, lambda: create_thread(session, server.url, "held words=3")
        )
        assert any(e.get("type") == "thread.created" for e in created[0][1])
        assert _probe(server.url)["store_threads"] >= 1


def test_more_calls_than_connections_queue_for_one_instead_of_timing_out(
    shared_pg_url: str,
) -> None:
    """On the hub, 8 writes at once through an engine of 2 connections (pool timeout
    1 s), all held 2.5 s by a lock: 2 hold the connections, the others wait their turn
    outside SQLAlchemy's pool (``SQLAlchemyStore._in_hub_slot``), and all 8 land. Left
    to wait in the pool, 6 would fail with its TimeoutError."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.reliability.hub_slots", shared_pg_url],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["errors"] == [None] * 8, outcome
    assert outcome["stored"] == 8, outcome
    assert outcome["connections_in_use_while_held"] == 2, outcome
    assert outcome["store_threads"] == 0, outcome  # greenlets on the hub, no native thread
    assert outcome["seconds"] >= 2.5, outcome  # they did wait for the lock
