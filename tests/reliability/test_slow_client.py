"""A client reading one byte a second does not slow anyone else's stream.

The slow client's tiny receive window backs the worker's socket up (checked in
``/proc/net/tcp``: the server side of that connection has unsent bytes queued),
so the worker is really blocked writing to it. Fails when that write blocks
anything but the slow client's own greenlet — e.g. a write done on the asyncio
loop thread, a blocking (non-gevent) socket, or a bounded channel whose full
queue stalls the shared loop: the other streams' durations would then stretch
far past 1.5x their nominal length.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.gunicorn import start_gunicorn

from .conftest import (
    APP_SPEC,
    abort,
    create_payload,
    create_thread,
    login,
    observations,
    raw_request,
    wait_until,
)

NOMINAL = 2.0  # words=20 delay=0.1
OTHER_TEXT = "words=20 delay=0.1"


def server_send_queue(server_port: int, client_port: int) -> int | None:
    """Bytes the server has queued but the client has not acknowledged (tx_queue)."""
    local = f"0100007F:{server_port:04X}"
    remote = f"0100007F:{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return int(fields[4].split(":")[0], 16)
    return None


@pytest.mark.timeout(120)
def test_slow_reader_does_not_slow_other_streams(tmp_path: Path) -> None:
    with start_gunicorn(tmp_path, APP_SPEC) as server:
        url = server.url
        session = login(url, "slow")
        create_thread(session, url, "words=3")  # warm up
        cookie = "session=" + session.cookies["session"]
        # ~500 events/s for 40+ s (several MB): far more than the socket buffers
        # hold, and still producing when the client finally drops.
        slow = raw_request(server.port, cookie, create_payload("words=20000 delay=0.002"),
                           rcvbuf=2048, timeout=10)
        slow_port = slow.getsockname()[1]
        received = b""
        try:
            received += slow.recv(1)

            def read_slowly(seconds: float) -> None:
                nonlocal received
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    received += slow.recv(1)
                    time.sleep(1)

            # Wait until the worker is backed up on the slow connection.
            assert wait_until(lambda: (server_send_queue(server.port, slow_port) or 0) > 4096,
                              15, 0.2), server_send_queue(server.port, slow_port)

            def timed_stream(n: int) -> float:
                own = login(url, f"other{n}")
                started = time.monotonic()
                _, events = create_thread(own, url, OTHER_TEXT)
                took = time.monotonic() - started
                assert [e["type"] for e in events].count("thread.item.updated") == 20
                return took

            with ThreadPoolExecutor(max_workers=11) as pool:
                reading = pool.submit(read_slowly, 2 * NOMINAL + 2)
                durations = list(pool.map(timed_stream, range(10), timeout=60))
                second = list(pool.map(timed_stream, range(10, 20), timeout=60))
                reading.result(timeout=30)

            slowest = max(durations + second)
            # Working: ~NOMINAL (2 s). Broken (the worker stuck writing to the slow
            # client): they wait for it, which reads a byte a second: the 60 s timeout.
            # 2 x NOMINAL keeps 4x+ from broken and room for a busy machine.
            assert slowest < 2 * NOMINAL, sorted(durations + second)
            # The slow client is still connected and still backed up.
            assert (server_send_queue(server.port, slow_port) or 0) > 4096
            received += slow.recv(1)
            assert received.startswith(b"HTTP/1.")
        finally:
            cancelled = observations(url)["cancelled"]
            abort(slow)
        # Dropping it cancels its stream like any other disconnect.
        assert wait_until(lambda: observations(url)["cancelled"] == cancelled + 1, 20)
        assert server.worker_pids() and "Traceback" not in server.log()
