"""Four gevent worker processes write one SQLite file at once: no error, exact counts.

Fails when two processes' writers collide — SQLite's "database is locked"
(no WAL, no busy timeout, or a deferred BEGIN upgraded to a write lock that
deadlocks), which reaches the client as a 503/500 or an error event — or when
a write is lost or doubled (counts off).
"""

from __future__ import annotations

import contextlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.gunicorn import start_gunicorn

from .conftest import (
    APP_SPEC,
    create_payload,
    item_text,
    list_items,
    list_threads,
    login,
    post,
    sse_events,
    thread_id_of,
    user_input,
    wait_until,
)

USERS = [f"writer{i}" for i in range(4)]


def _all_answered(server: Any) -> bool:
    """One more probe; True once every worker's pid is in the access log of a probe."""
    with contextlib.suppress(requests.RequestException):
        requests.get(f"{server.url}/_test/loop", timeout=5)
    answered = set(re.findall(r"ACCESS <?(\d+)>? GET /_test/loop ", server.log()))
    return {str(pid) for pid in server.worker_pids()} <= answered
PER_USER = 20


@pytest.mark.timeout(180)
def test_four_sqlite_workers_write_concurrently(tmp_path: Path) -> None:
    env = {"CHATKIT_TEST_STORE": "sql",
           "CHATKIT_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.sqlite3'}"}
    # The access log names the worker pid of every request.
    extra = ["--access-logfile", "-", "--access-logformat", "ACCESS %(p)s %(r)s %(s)s"]
    with start_gunicorn(tmp_path, APP_SPEC, env=env, workers=4, extra_args=extra) as server:
        url = server.url
        # Let all four workers boot (slow on a loaded machine) before any timed request:
        # each has answered once its pid shows in the access log.
        assert wait_until(lambda: len(server.worker_pids()) == 4, 90), server.log()
        assert wait_until(lambda: _all_answered(server), 90), server.log()
        sessions = {u: login(url, u) for u in USERS}
        # The tables exist before the rush (the first store call of a worker makes them).
        for session in sessions.values():
            assert post(session, url, {"type": "threads.list", "params": {}},
                        timeout=60).status_code == 200

        def create(user: str, n: int) -> tuple[int, str, str | None]:
            response = post(sessions[user], url, create_payload(f"words=5 delay=0.02 n={n}"),
                            timeout=60)
            events = sse_events(response.content)
            errors = [e for e in events if e.get("type") == "error"]
            return response.status_code, response.text if errors else "", thread_id_of(events)

        jobs = [(u, n) for n in range(PER_USER) for u in USERS]
        with ThreadPoolExecutor(max_workers=16) as pool:
            results = list(pool.map(lambda job: create(*job), jobs, timeout=150))
        failures = [r for r in results if r[0] != 200 or r[1] or not r[2]]
        assert failures == []

        # A second wave continues every thread at once (writes to existing threads).
        def follow_up(user: str, thread_id: str) -> tuple[int, str]:
            response = post(sessions[user], url, {"type": "threads.add_user_message", "params": {
                "thread_id": thread_id, "input": user_input("words=3")}}, timeout=60)
            bad = [e for e in sse_events(response.content) if e.get("type") == "error"]
            return response.status_code, response.text if bad else ""

        owners = [(jobs[i][0], str(results[i][2])) for i in range(len(jobs))]
        with ThreadPoolExecutor(max_workers=16) as pool:
            second = list(pool.map(lambda job: follow_up(*job), owners, timeout=150))
        assert [r for r in second if r != (200, "")] == []

        # Counts exact: 20 threads per user, each with exactly its four items.
        for user, session in sessions.items():
            threads = list_threads(session, url)
            assert len(threads) == PER_USER, user
            for thread in threads:
                items = list_items(session, url, thread["id"])
                assert [i["type"] for i in items] == [
                    "user_message", "assistant_message", "user_message", "assistant_message"]
                assert item_text(items[1]) == "w0 w1 w2 w3 w4 "
        expected = {str(r[2]) for r in results}
        listed = {t["id"] for s in sessions.values() for t in list_threads(s, url)}
        assert listed == expected and len(expected) == len(USERS) * PER_USER

        log = server.log()
        assert "database is locked" not in log.lower()
        assert "Traceback" not in log
        # The writes really came from several processes at once.
        pids = set(re.findall(r"ACCESS <?(\d+)>? POST /chatkit ", log))
        assert len(server.worker_pids()) == 4
        assert len(pids) >= 2, pids
