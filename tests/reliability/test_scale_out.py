"""Two gunicorn servers on two ports share one PostgreSQL database.

Fails when state lives in a process instead of the database (a thread made on
one server unknown to the other, a per-process cache serving stale items after
the other server wrote), when the two servers do not share the Flask
SECRET_KEY (the session cookie from one would be a 401 on the other), or when
ownership is not enforced across servers.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from .conftest import (
    add_message_payload,
    create_thread,
    list_items,
    list_threads,
    login,
    post,
    serve,
    stream,
)


@pytest.mark.timeout(180)
def test_two_servers_one_postgres(tmp_path: Path, shared_pg_url: str) -> None:
    with serve(tmp_path, database_url=shared_pg_url) as a, \
            serve(tmp_path, database_url=shared_pg_url) as b:
        assert a.port != b.port
        # One login on A; requests sends the cookie to both ports of 127.0.0.1.
        session = login(a.url, "ada")
        listed_on_b = post(session, b.url, {"type": "threads.list", "params": {}})
        assert listed_on_b.status_code == 200, "A's session cookie is not accepted by B"
        anonymous = post(requests.Session(), b.url, {"type": "threads.list", "params": {}})
        assert anonymous.status_code == 401  # so the 200 above really was the cookie

        # Created on A ...
        thread_id, _ = create_thread(session, a.url, "words=3")
        # ... listed and read on B,
        assert thread_id in {t["id"] for t in list_threads(session, b.url)}
        assert [i["type"] for i in list_items(session, b.url, thread_id)] == [
            "user_message", "assistant_message"]
        # continued on B and seen on A,
        stream(session, b.url, add_message_payload(thread_id, "words=4"))
        items = list_items(session, a.url, thread_id)
        assert [i["type"] for i in items] == [
            "user_message", "assistant_message", "user_message", "assistant_message"]
        # another user cannot see it through either server,
        bob = login(b.url, "bob")
        for server in (a, b):
            foreign = post(bob, server.url, {"type": "threads.get_by_id",
                                              "params": {"thread_id": thread_id}})
            assert foreign.status_code == 404
        # deleted through B and gone on A.
        deleted = post(session, b.url, {"type": "threads.delete",
                                        "params": {"thread_id": thread_id}})
        assert deleted.status_code == 200, deleted.text
        gone = post(session, a.url, {"type": "threads.get_by_id",
                                     "params": {"thread_id": thread_id}})
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "not_found"
        assert thread_id not in {t["id"] for t in list_threads(session, a.url)}

        # Both servers writing at once: each sees all of the other's threads.
        def create_on(url: str) -> str:
            return create_thread(session, url, "words=2 delay=0.01")[0]

        with ThreadPoolExecutor(max_workers=8) as pool:
            made = list(pool.map(create_on, [a.url, b.url] * 10, timeout=120))
        assert len(set(made)) == 20
        on_a = {t["id"] for t in list_threads(session, a.url)}
        on_b = {t["id"] for t in list_threads(session, b.url)}
        assert on_a == on_b == set(made)
        for log in (a.log(), b.log()):
            assert "Traceback" not in log
