"""Replies survive a crash (CHATKIT_CHECKPOINT_SECONDS), on real gunicorn -k gevent.

Fails when: after a worker ``kill -9`` mid-reply the thread lacks the assistant text
up to the last checkpoint (or holds it under another id than the client saw), on
SQLite or PostgreSQL; or, with PostgreSQL stopped mid-reply, the stream goes on
streaming the reply instead of ending soon with an error event.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.gunicorn import start_gunicorn

from .conftest import (
    APP_SPEC,
    StreamReader,
    create_payload,
    item_text,
    list_items,
    login,
    raw_request,
    wait_until,
)

CHECKPOINT = 0.5  # seconds between checkpoints
DELAY = 0.05  # seconds between the reply's words
PER_CHECKPOINT = round(CHECKPOINT / DELAY)  # words one interval streams


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'crash.sqlite3'}"
    else:
        yield request.getfixturevalue("shared_pg_url")


def _serving(url: str) -> bool:
    try:
        return requests.get(f"{url}/_test/observations", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start_reply(server: Any, session: requests.Session, words: int) -> StreamReader:
    cookie = "session=" + session.cookies["session"]
    text = f"words={words} delay={DELAY}"
    sock = raw_request(server.port, cookie, create_payload(text), timeout=30)
    reader = StreamReader(sock)
    assert reader.read_headers() == 200
    return reader


def reply_id(reader: StreamReader) -> str | None:
    for event in reader.events:
        if event.get("type") == "thread.item.added" and (
            event["item"]["type"] == "assistant_message"
        ):
            return str(event["item"]["id"])
    return None


@pytest.mark.timeout(150)
def test_kill_9_mid_reply_keeps_the_text_up_to_the_last_checkpoint(
    tmp_path: Path, database_url: str
) -> None:
    env = {"CHATKIT_TEST_STORE": "sql", "CHATKIT_DATABASE_URL": database_url,
           "CHATKIT_CHECKPOINT_SECONDS": str(CHECKPOINT)}
    with start_gunicorn(tmp_path, APP_SPEC, env=env) as server:
        session = login(server.url, "crash")
        (old_pid,) = server.worker_pids()
        reader = start_reply(server, session, 400)  # 20 s of reply
        # About 4 checkpoints' worth of words, then the worker dies.
        while reader.deltas().count(" ") < 4 * PER_CHECKPOINT:
            assert reader.next_event() is not None
        seen = reader.deltas()
        item_id, thread_id = reply_id(reader), reader.thread_id()
        assert item_id and thread_id
        os.kill(old_pid, signal.SIGKILL)
        reader.sock.close()

        assert wait_until(lambda: [p for p in server.worker_pids() if p != old_pid] != [], 30)
        assert wait_until(lambda: _serving(server.url), 30)
        items = list_items(session, server.url, thread_id)
        assert [i["type"] for i in items] == ["user_message", "assistant_message"], items
        assert items[0]["content"][0]["text"] == f"words=400 delay={DELAY}"
        reply = items[1]
        assert reply["id"] == item_id  # the id the client saw
        kept = item_text(reply)
        # A prefix of what the client saw, short of it by at most about one interval
        # (plus the events in flight when the worker died).
        assert seen.startswith(kept), (kept, seen)
        assert len(seen.split()) - len(kept.split()) <= 2 * PER_CHECKPOINT, (kept, seen)
        assert len(kept.split()) >= 2 * PER_CHECKPOINT


@pytest.mark.timeout(180)
def test_postgres_stopped_mid_reply_ends_the_stream_with_an_error(
    tmp_path: Path, private_pg_cluster: Any
) -> None:
    cluster = private_pg_cluster
    env = {"CHATKIT_TEST_STORE": "sql", "CHATKIT_DATABASE_URL": cluster.url,
           "CHATKIT_CHECKPOINT_SECONDS": str(CHECKPOINT)}
    with start_gunicorn(tmp_path, APP_SPEC, env=env) as server:
        session = login(server.url, "outage")
        reader = start_reply(server, session, 400)  # 20 s of reply
        while reader.deltas().count(" ") < 2 * PER_CHECKPOINT:
            assert reader.next_event() is not None
        thread_id, item_id = reader.thread_id(), reply_id(reader)
        stopping = time.monotonic()
        cluster.stop()
        stopped = time.monotonic()
        at_stop = len(reader.events)
        try:
            while reader.next_event() is not None:
                assert time.monotonic() - stopping < 20
            ended = time.monotonic()
        finally:
            reader.sock.close()
            cluster.start()
        # The next checkpoint (at most CHECKPOINT after the stop) fails on a refused
        # connection and the stream ends: measured 0.25 s after pg_ctl returned (8
        # events); the worst case is one interval more, 0.75 s; the bound is 4x that.
        # Without checkpoints the reply streamed on for its remaining ~18 s.
        bound = 4 * (CHECKPOINT + 0.25)
        assert ended - stopped < bound, (ended - stopped, stopped - stopping)
        assert reader.events[-1]["type"] == "error", reader.events[-3:]
        after = reader.events[at_stop:]
        assert len(after) < bound / DELAY, len(after)  # not the rest of the reply
        # Once PostgreSQL is back, the thread holds the text up to the last checkpoint.
        assert wait_until(lambda: _serving(server.url), 30)
        items: list[dict[str, Any]] = []
        for _ in range(50):  # the pool pre-pings its dead connections away
            try:
                items = list_items(session, server.url, str(thread_id))
                break
            except AssertionError:
                time.sleep(0.2)
        assert [i["type"] for i in items] == ["user_message", "assistant_message"], items
        assert items[1]["id"] == item_id
        kept = item_text(items[1])
        assert kept and reader.deltas().startswith(kept)
