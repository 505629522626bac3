"""Many first requests at once, on a fresh PostgreSQL database, under gevent.

The first request creates the tables while the others wait. psycopg waits for the
server cooperatively, so the creating greenlet lets the others run; a waiter that
blocked the hub's OS thread (a native lock) would keep the creator from ever
finishing, and every request would hang until gunicorn killed the worker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.gunicorn import start_gunicorn

from .conftest import APP_SPEC, login, post

FIRST_REQUESTS = 20


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_first_requests_at_once_all_answer(tmp_path: Path, pg_cluster: Any) -> None:
    url = pg_cluster.create_database()
    env = {"CHATKIT_TEST_STORE": "sql", "CHATKIT_DATABASE_URL": url}
    with start_gunicorn(tmp_path, APP_SPEC, env=env, workers=1) as server:
        sessions = [login(server.url, f"user{n}") for n in range(FIRST_REQUESTS)]

        def first(session: Any) -> int:
            response = post(session, server.url, {"type": "threads.list", "params": {}},
                            timeout=30)  # fmt: skip
            return response.status_code

        with ThreadPoolExecutor(max_workers=FIRST_REQUESTS) as pool:
            statuses = list(pool.map(first, sessions, timeout=60))
        assert statuses == [200] * FIRST_REQUESTS
