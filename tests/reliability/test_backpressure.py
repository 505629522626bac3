"""Clients that never read: the stream's buffer is bounded and ChatKit pauses.

Before: the per-stream channel was unbounded, so a reply nobody read piled up
in the worker (5 clients of a ~20 MB reply in finish mode: ~300 MB). Now the
pump waits once ``MAX_BUFFERED_BYTES`` are queued for the reader; a disconnect
still cancels (the partial reply is persisted) or, in finish mode, lets the
reply run to completion and persists all of it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from .conftest import (
    StreamReader,
    abort,
    cookie_of,
    create_payload,
    create_thread,
    item_text,
    login,
    observations,
    proc_status,
    raw_request,
    serve,
    store_items,
    wait_until,
)

CLIENTS = 3
MIB = 1024 * 1024
BIG_REPLY = "words=2000 pad=10000"  # 2,000 deltas of 10 kB: a 20 MB reply


def rss(pid: int) -> int:
    return proc_status(pid, "VmRSS") * 1024


def open_non_reader(port: int, cookie: str, text: str) -> tuple[socket.socket, str]:
    """Start a stream, read up to the thread id, then stop reading (tiny receive window)."""
    sock = raw_request(port, cookie, create_payload(text), rcvbuf=4096, timeout=30)
    try:
        reader = StreamReader(sock)
        assert reader.read_headers() == 200
        for _ in range(100):  # bounded: the id is in the first few events
            if reader.thread_id() is not None:
                break
            assert reader.next_event() is not None
        thread_id = reader.thread_id()
        assert thread_id
    except BaseException:
        abort(sock)
        raise
    return sock, thread_id


def peak_growth(pid: int, baseline: int, seconds: float, limit: int) -> int:
    """The highest RSS growth seen over ``seconds`` (stops early past ``limit``)."""
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss(pid) - baseline)
        if peak > limit:
            break
        time.sleep(0.25)
    return peak


def assistant_texts(base_url: str, user: str, thread_id: str) -> list[str]:
    items = store_items(base_url, user, thread_id)
    return [item_text(i) for i in items if i["type"] == "assistant_message"]


@pytest.mark.timeout(120)
def test_non_reading_clients_hold_bounded_memory_and_are_cancelled_inside_chatkit(
    tmp_path: Path,
) -> None:
    with serve(tmp_path) as server, contextlib.ExitStack() as sockets:
        session = login(server.url, "idle")
        create_thread(session, server.url, "words=3 pad=10000")  # warm up
        cookie = cookie_of(session)
        (pid,) = server.worker_pids()
        baseline = rss(pid)
        # delay: respond awaits between words, as a model call would.
        streams = []
        for _ in range(CLIENTS):
            sock, thread_id = open_non_reader(server.port, cookie, BIG_REPLY + " delay=0.0001")
            sockets.callback(abort, sock)  # closed on every path (abort is idempotent)
            streams.append((sock, thread_id))
        # Unbounded, each of these buffered its whole 20 MB reply (the worker grew
        # ~115 MiB for three 8 MB replies). Bounded: the socket buffers, 256 KiB
        # per stream and the text ChatKit has accumulated so far.
        limit = 80 * MIB
        growth = peak_growth(pid, baseline, 6.0, limit)
        assert growth < limit, f"worker grew {growth / MIB:.0f} MiB for {CLIENTS} idle readers"

        # The other streams of the worker still run.
        _, events = create_thread(login(server.url, "busy"), server.url, "words=50", timeout=30)
        assert sum(e.get("type") == "thread.item.updated" for e in events) == 50

        for sock, _ in streams:
            abort(sock)
        # Each paused stream is cancelled inside respond (CancelledError there), and
        # ChatKit stores the partial reply with its hidden "cancelled" item.
        assert wait_until(lambda: observations(server.url)["cancelled"] == CLIENTS, 30)
        for _, thread_id in streams:
            (partial,) = assistant_texts(server.url, "idle", thread_id)
            assert 0 < len(partial.split()) < 2000
            kinds = [i["type"] for i in store_items(server.url, "idle", thread_id)]
            assert "sdk_hidden_context" in kinds


@pytest.mark.timeout(120)
def test_finish_mode_resumes_a_paused_reply_after_disconnect_and_stores_it_whole(
    tmp_path: Path,
) -> None:
    with serve(tmp_path, env={"CHATKIT_ON_DISCONNECT": "finish"}) as server:
        session = login(server.url, "idle")
        (pid,) = server.worker_pids()
        baseline = rss(pid)
        words = 600  # 6 MB: more than the socket buffers and the stream's own
        sock, thread_id = open_non_reader(
            server.port, cookie_of(session), f"words={words} pad=10000"
        )
        try:
            growth = peak_growth(pid, baseline, 3.0, 30 * MIB)
            assert not assistant_texts(server.url, "idle", thread_id)  # paused, not done
        finally:
            abort(sock)
        expected = "".join(f"w{n}{'x' * 10000} " for n in range(words))
        assert wait_until(lambda: assistant_texts(server.url, "idle", thread_id) == [expected], 60)
        assert observations(server.url)["cancelled"] == 0
        assert growth < 30 * MIB
