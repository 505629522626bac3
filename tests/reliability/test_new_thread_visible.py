"""``thread.created`` means the thread exists: readable at once from another connection.

The client gets a new thread's id from ``thread.created`` and may use it straight
away — ChatKit.js fetches it, a second tab lists it. Each of 30 creates here is
followed, as soon as ``thread.created`` arrives and while its stream is still open,
by ``threads.get_by_id`` on another connection (any of two worker processes):
every one must be a 200 naming the thread. (The user's message may still be on its
way: ``save_thread`` has stored the thread when ChatKit sends ``thread.created``, the
message is stored next.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.gunicorn import start_gunicorn
from tests.http_client import cookie_header

from .conftest import (
    APP_SPEC,
    StreamReader,
    create_payload,
    login,
    post,
    raw_request,
    wait_until,
)

CREATES = 30


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/_test/loop", timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.timeout(120)
def test_thread_is_readable_as_soon_as_thread_created_arrives(
    tmp_path: Path, store_url: str
) -> None:
    # store_url (tests/pg.py): a SQLite file, or a PostgreSQL database dropped afterwards.
    env = {"CHATKIT_TEST_STORE": "sql", "CHATKIT_DATABASE_URL": store_url}
    with start_gunicorn(tmp_path, APP_SPEC, env=env, workers=2) as server:
        # Both workers answer before the run (booting is slow on a loaded machine).
        assert wait_until(lambda: _answers(server.url), timeout=60)
        creator = login(server.url, "alice")
        reader = login(server.url, "alice")  # a connection of its own
        assert post(reader, server.url, {"type": "threads.list", "params": {}}).status_code == 200
        cookie = cookie_header(creator)
        statuses: list[int] = []
        for n in range(CREATES):
            sock = raw_request(server.port, cookie, create_payload(f"words=3 delay=0.02 n={n}"))
            try:
                stream = StreamReader(sock)
                assert stream.read_headers() == 200
                first = stream.next_event()
                assert first is not None and first["type"] == "thread.created", first
                thread_id = first["thread"]["id"]
                got = post(reader, server.url, {
                    "type": "threads.get_by_id", "params": {"thread_id": thread_id}})
                statuses.append(got.status_code)
                if got.status_code == 200:
                    items = got.json()["items"]["data"]
                    assert got.json()["id"] == thread_id
                    assert [i["type"] for i in items][:1] in ([], ["user_message"]), items
                # the stream was still open: the reply streams on after the read
                rest = []
                for _ in range(200):
                    event = stream.next_event()
                    if event is None:
                        break
                    rest.append(event["type"])
                assert "thread.item.updated" in rest and "error" not in rest, rest
            finally:
                sock.close()
        assert statuses == [200] * CREATES, f"{statuses.count(404)} of {CREATES} got 404"
