"""Deploys keep partial replies: a real gunicorn told to stop while streams run.

gunicorn SIGKILLs a worker exactly ``graceful_timeout`` after the master's SIGTERM,
and its own workers only kill their handlers later (see bridge/lifecycle.py). Every
server here runs with NO config file (its cwd holds no gunicorn.conf.py),
``--graceful-timeout 4`` and ``CHATKIT_CANCEL_TIMEOUT=1``, so streams still open
4 - 1 - 1 (margin) = 2 s after the stop are cancelled then.

Fails when: a long stream is not ended before the SIGKILL (or is cut at once
although the plan leaves it 2 s), its partial reply or the SDK's "stream
cancelled" marker is missing from the store, a reply ending inside the grace
period is cut or marked, the worker has to be SIGKILLed, or the warning for a
CHATKIT_CANCEL_TIMEOUT that cannot fit is missing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_chatkit import RequestContext, SQLAlchemyStore
from flask_chatkit.bridge.lifecycle import STOP_MARGIN, WORKER_GC_THRESHOLD
from tests.gunicorn import RunningServer, start_gunicorn

from .conftest import (
    APP_SPEC,
    DELTA,
    StreamReader,
    create_payload,
    login,
    raw_request,
    store_items,
    wait_until,
)

GRACE = 4.0
CANCEL_TIMEOUT = 1.0
CANCEL_AFTER = GRACE - CANCEL_TIMEOUT - STOP_MARGIN  # 2 s
LONG = "words=400 delay=0.05"  # 20 s: far past the grace period
SHORT_WORDS = 10  # ~0.35 s left at the stop (0.05 s a word): ends long before the cancel point
SHORT = f"words={SHORT_WORDS} delay=0.05"
CANCEL_MARKER = "The user cancelled the stream"
USER = "deployer"
WORKER_ARGS = {"gevent": [], "gthread": ["--threads", "16"]}


def _server(
    tmp_path: Path,
    worker_class: str,
    *,
    extra_args: list[str] | None = None,
    graceful: float | None = GRACE,
    cancel_timeout: float | None = CANCEL_TIMEOUT,
    env: dict[str, str] | None = None,
) -> Any:
    env = {
        "CHATKIT_TEST_STORE": "sql",
        "CHATKIT_DATABASE_URL": _db_url(tmp_path),
        **(env or {}),
    }
    if cancel_timeout is not None:
        env["CHATKIT_CANCEL_TIMEOUT"] = str(cancel_timeout)
    run_dir = tmp_path / "run"  # no gunicorn.conf.py here: gunicorn reads no config file
    run_dir.mkdir(exist_ok=True)
    return start_gunicorn(
        tmp_path,
        APP_SPEC,
        env=env,
        worker_class=worker_class,
        extra_args=[*WORKER_ARGS[worker_class], *(extra_args or [])],
        graceful_timeout=graceful,
        cwd=run_dir,
    )


def _db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'deploy.sqlite3'}"


def _login_cookie(server: RunningServer) -> str:
    """A logged-in cookie; the login connection is closed (no idle keep-alive left)."""
    with login(server.url, USER) as session:
        return "session=" + session.cookies["session"]


def _the_worker(server: RunningServer) -> int:
    """The pid of the one worker (the master listens before it forks it)."""
    assert wait_until(lambda: len(server.worker_pids()) == 1, 30), server.log()
    (pid,) = server.worker_pids()
    return pid


def _open_stream(server: RunningServer, cookie: str, text: str) -> StreamReader:
    """Start a reply and read until it has streamed a few words."""
    reader = StreamReader(raw_request(server.port, cookie, create_payload(text), timeout=30))
    assert reader.read_headers() == 200
    while reader.deltas().count(" ") < 3:
        assert reader.next_event() is not None, reader.events
    assert reader.thread_id()
    return reader


def _read_to_end(reader: StreamReader) -> float:
    """Read the rest of the reply; the moment it ended."""
    deadline = time.monotonic() + 30
    while reader.next_event() is not None:
        assert time.monotonic() < deadline
    reader.sock.close()
    return time.monotonic()


def _ends(readers: list[StreamReader]) -> list[float]:
    with ThreadPoolExecutor(len(readers)) as pool:
        return list(pool.map(_read_to_end, readers))


def _words(count: int) -> str:
    return "".join(f"w{i} " for i in range(count))


def _text(item: dict[str, Any]) -> str:
    return "".join(part.get("text", "") for part in item.get("content", []))


def _assert_cancelled_and_saved(items: list[dict[str, Any]], received: str) -> None:
    """The partial reply (at least what the client saw) and the SDK's cancel marker."""
    types = [item["type"] for item in items]
    assert types == ["user_message", "assistant_message", "sdk_hidden_context"], types
    saved = _text(items[1])
    assert saved.startswith(received) and _words(400).startswith(saved), (saved, received)
    assert CANCEL_MARKER in items[2]["content"]


def _assert_finished(items: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    assert [item["type"] for item in items] == ["user_message", "assistant_message"], items
    assert _text(items[1]) == _words(SHORT_WORDS)
    assert any(
        e["type"] == "thread.item.done" and e["item"]["type"] == "assistant_message"
        for e in events
    ), events


def _stored_items(db_url: str, thread_id: str) -> list[dict[str, Any]]:
    """Straight from the database, by a fresh store (the server is gone)."""
    store = SQLAlchemyStore(db_url)
    try:
        page = asyncio.run(
            store.load_thread_items(thread_id, None, 100, "asc", RequestContext(user_id=USER))
        )
    finally:
        store.close()
    return [item.model_dump(mode="json") for item in page.data]


def _stop_during_streams(
    server: RunningServer, stop: Callable[[], float], longs: int = 3
) -> tuple[float, list[StreamReader], StreamReader, list[float], float]:
    """Open ``longs`` long replies, then ``stop``; a short reply starts just before.

    Returns (stop time, long readers, short reader, long end times, short end time).
    """
    cookie = _login_cookie(server)
    long_readers = [_open_stream(server, cookie, LONG) for _ in range(longs)]
    short = _open_stream(server, cookie, SHORT)
    stopped = stop()
    *long_ends, short_end = _ends([*long_readers, short])
    return stopped, long_readers, short, long_ends, short_end


def _signal(server: RunningServer, sig: signal.Signals) -> Callable[[], float]:
    """A ``stop`` for :func:`_stop_during_streams`: signal the master, return when."""

    def send() -> float:
        server.proc.send_signal(sig)
        return time.monotonic()

    return send


def _assert_replaced_and_saved(
    server: RunningServer, old: int, longs: list[StreamReader], short: StreamReader
) -> None:
    """The old worker is gone, a new one serves, and every reply is in the store."""
    assert wait_until(lambda: old not in server.worker_pids(), GRACE + 2), server.log()
    assert wait_until(lambda: len(server.worker_pids()) == 1, 10), server.log()
    for reader in longs:
        items = store_items(server.url, USER, str(reader.thread_id()))
        _assert_cancelled_and_saved(items, reader.deltas())
    _assert_finished(store_items(server.url, USER, str(short.thread_id())), short.events)


# "At once" in these tests: within a quarter of the time the broken server takes. Cut
# at once, long replies end ~0 s after the stop, not CANCEL_AFTER (2 s) later; a stop
# that waits for them ends them at the SIGKILL, GRACE (4 s) after it.
AT_ONCE = CANCEL_AFTER / 4


def _assert_timing(stopped: float, long_ends: list[float], short_end: float) -> None:
    after = [round(end - stopped, 2) for end in long_ends]
    # Not cut at once: the plan leaves replies CANCEL_AFTER s (cut at once: ~0 s).
    # Ended before the SIGKILL: that is shown by events, not a clock: the SDK's cancel
    # marker is in the store for each (_assert_cancelled_and_saved), which a killed
    # worker never writes.
    assert all(t >= AT_ONCE for t in after), after
    # The short reply ran to its end while the long ones still streamed (held back
    # until the cancel point, it would end with them; its text is checked whole).
    assert short_end < min(long_ends), (short_end - stopped, after)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_master_sigterm_saves_every_partial_reply(tmp_path: Path, worker_class: str) -> None:
    with _server(tmp_path, worker_class) as server:
        worker = _the_worker(server)

        stop = _signal(server, signal.SIGTERM)
        stopped, longs, short, long_ends, short_end = _stop_during_streams(server, stop)
        server.proc.wait(timeout=GRACE + 5)
        exited = time.monotonic() - stopped
        log = server.log()
    print(
        f"\n{worker_class}: SIGTERM +0; long streams ended at "
        f"{[round(t - stopped, 2) for t in long_ends]} s, short at {short_end - stopped:.2f} s,"
        f" master exited at {exited:.2f} s (graceful_timeout {GRACE:g} s)"
    )
    _assert_timing(stopped, long_ends, short_end)
    # The worker left its serving loop by itself (a SIGKILL leaves no such line). Its
    # interpreter teardown may still meet the SIGKILL on a loaded machine: harmless.
    assert f"Worker exiting (pid: {worker})" in log, log
    assert "cancelled 3 open streams" in log, log
    for reader in longs:
        _assert_cancelled_and_saved(
            _stored_items(_db_url(tmp_path), str(reader.thread_id())), reader.deltas()
        )
    _assert_finished(_stored_items(_db_url(tmp_path), str(short.thread_id())), short.events)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_hup_reload_saves_partial_replies(tmp_path: Path, worker_class: str) -> None:
    with _server(tmp_path, worker_class) as server:
        old = _the_worker(server)

        stop = _signal(server, signal.SIGHUP)
        stopped, longs, short, long_ends, short_end = _stop_during_streams(server, stop)
        _assert_timing(stopped, long_ends, short_end)
        # The old worker leaves on its own (the master never SIGKILLs on HUP).
        _assert_replaced_and_saved(server, old, longs, short)
        assert "SIGKILL" not in server.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_max_requests_recycling_saves_partial_replies(tmp_path: Path, worker_class: str) -> None:
    # start_gunicorn's readiness probe + login + 3 long replies + the short one: the
    # short request (the sixth) retires the worker.
    args = ["--max-requests", "6", "--max-requests-jitter", "0"]
    with _server(tmp_path, worker_class, extra_args=args) as server:
        old = _the_worker(server)
        cookie = _login_cookie(server)
        longs = [_open_stream(server, cookie, LONG) for _ in range(3)]
        stopped = time.monotonic()  # the sixth request sets alive = False
        short = _open_stream(server, cookie, SHORT)
        *long_ends, short_end = _ends([*longs, short])
        # No signal here: the worker's alive flag is polled (lifecycle.POLL_INTERVAL).
        _assert_timing(stopped, long_ends, short_end)
        _assert_replaced_and_saved(server, old, longs, short)


@pytest.mark.timeout(60)
def test_cancel_timeout_that_cannot_fit_warns_and_cancels_at_once(tmp_path: Path) -> None:
    # CHATKIT_CANCEL_TIMEOUT's default (10 s) cannot fit in a 3 s grace period.
    with _server(tmp_path, "gevent", graceful=3, cancel_timeout=None) as server:
        warning = "does not fit in gunicorn's graceful_timeout"
        assert wait_until(lambda: warning in server.log(), 30), server.log()
        worker = _the_worker(server)
        cookie = _login_cookie(server)
        longs = [_open_stream(server, cookie, LONG) for _ in range(3)]
        server.proc.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        ends = [round(t - stopped, 2) for t in _ends(longs)]
        # Cancelled at once: not at the SIGKILL 3 s later (4x the bound).
        assert all(t < 3.0 / 4 for t in ends), ends
        server.proc.wait(timeout=8)
        assert f"Worker exiting (pid: {worker})" in server.log(), server.log()
    for reader in longs:
        _assert_cancelled_and_saved(
            _stored_items(_db_url(tmp_path), str(reader.thread_id())), reader.deltas()
        )


@pytest.mark.timeout(60)
def test_plan_reads_gunicorns_default_grace_period(tmp_path: Path) -> None:
    """No config file and no --graceful-timeout: gunicorn's 30 s default is used."""
    with _server(tmp_path, "gevent", graceful=None, cancel_timeout=None) as server:
        # The plan is made once the worker's loop runs (a stream or a probe starts it).
        reader = _open_stream(server, _login_cookie(server), "words=3")
        _read_to_end(reader)
        probe = requests.get(f"{server.url}/_test/lifecycle", timeout=10).json()
        plan = probe["plan"]
        log = server.log()
    # What the worker built at start-up is kept out of full collections (gc.freeze),
    # and young collections run a tenth as often.
    assert probe["gc_frozen"] > 10_000
    assert probe["gc_threshold"] == [WORKER_GC_THRESHOLD, 10, 10]
    assert plan == {
        "graceful_timeout": 30.0,
        "cancel_timeout": 10.0,
        "cancel_after": 30.0 - 10.0 - STOP_MARGIN,
        "fits": True,
    }
    assert "does not fit" not in log
    assert not [e for e in reader.events if e.get("type") == "error"]
    assert any(e.get("update", {}).get("type") == DELTA for e in reader.events)


@pytest.mark.timeout(60)
def test_an_apps_own_gc_thresholds_are_kept(tmp_path: Path) -> None:
    """An app that set its collector's thresholds before init_app keeps them."""
    with _server(tmp_path, "gevent", env={"TEST_GC_THRESHOLD": "900,7,3"}) as server:
        reader = _open_stream(server, _login_cookie(server), "words=3")
        _read_to_end(reader)
        probe = requests.get(f"{server.url}/_test/lifecycle", timeout=10).json()
    assert probe["plan"] is not None  # in a worker: the tuning ran, and left these alone
    assert probe["gc_frozen"] > 10_000
    assert probe["gc_threshold"] == [900, 7, 3]


@pytest.mark.timeout(60)
def test_quick_shutdown_cancels_at_once_and_saves(tmp_path: Path) -> None:
    """SIGINT on the master sends the workers SIGQUIT: they exit at once, streams saved."""
    with _server(tmp_path, "gevent") as server:
        cookie = _login_cookie(server)
        longs = [_open_stream(server, cookie, LONG) for _ in range(3)]
        server.proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        ends = [round(t - stopped, 2) for t in _ends(longs)]
        # At once, not after the GRACE s a graceful stop may take (4x the bound).
        assert all(t < GRACE / 4 for t in ends), ends
        server.proc.wait(timeout=GRACE + 5)
        log = server.log()
        cancelled = re.search(r"cancelled 3 open streams ([0-9.]+) s after the stop", log)
        assert cancelled is not None, log
        assert float(cancelled.group(1)) < GRACE / 4, log
    for reader in longs:
        _assert_cancelled_and_saved(
            _stored_items(_db_url(tmp_path), str(reader.thread_id())), reader.deltas()
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("target", ["master", "worker"])
def test_sigquit_cancels_at_once_and_saves(tmp_path: Path, target: str) -> None:
    """SIGQUIT, to the master (quick shutdown: it SIGQUITs its workers) or to a gevent
    worker itself: the documented quick stop, open replies cancelled and saved at once."""
    with _server(tmp_path, "gevent") as server:
        worker = _the_worker(server)
        cookie = _login_cookie(server)
        longs = [_open_stream(server, cookie, LONG) for _ in range(2)]
        if target == "master":
            server.proc.send_signal(signal.SIGQUIT)
        else:
            os.kill(worker, signal.SIGQUIT)
        stopped = time.monotonic()
        ends = [round(t - stopped, 2) for t in _ends(longs)]
        # AT_ONCE: a quarter of the CANCEL_AFTER (2 s) a graceful stop would wait.
        assert all(t < AT_ONCE for t in ends), ends
        if target == "master":
            server.proc.wait(timeout=GRACE + 5)
        else:  # the master replaces the worker that quit
            assert wait_until(lambda: worker not in server.worker_pids(), GRACE + 2)
            assert wait_until(lambda: len(server.worker_pids()) == 1, 30), server.log()
        log = server.log()
    assert "worker stopping (SIGQUIT)" in log, log
    cancelled = re.search(r"cancelled 2 open streams ([0-9.]+) s after the stop", log)
    assert cancelled is not None, log
    assert float(cancelled.group(1)) < AT_ONCE, log
    for reader in longs:
        _assert_cancelled_and_saved(
            _stored_items(_db_url(tmp_path), str(reader.thread_id())), reader.deltas()
        )
