"""sync_to_async / sync_to_async_iter as units (native threads) and under the Flask test client.

The gevent side (greenlets on the hub, killed on cancel) runs under a real
gunicorn in tests/test_sync.py.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chatkit.types import ErrorEvent, ThreadItemUpdatedEvent
from flask import Flask

from flask_chatkit import sync_to_async, sync_to_async_iter
from flask_chatkit.bridge.native import NativeThreadPool

from .helpers import login_as
from .sync_app import Note, create_sync_app, db

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


# Timing bounds here tell working from broken by 4x or more: a blocking call of
# BLOCK seconds that ran on the loop would stall it BLOCK seconds; the helpers must
# keep the stall under BLOCK / 4 (idle: ~10 ms), even beside two busy processes.
BLOCK = 2.0
MAX_STALL = BLOCK / 4


class Ticker:
    """Measures the loop's responsiveness: the longest gap between 10 ms ticks."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    def stop(self) -> float:
        assert self.task is not None
        self.task.cancel()
        return max(b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False))


def test_sync_to_async_runs_off_the_loop_and_returns() -> None:
    def work(a: int, *, b: int) -> tuple[int, int, str]:
        time.sleep(BLOCK)
        return a + b, threading.get_ident(), request_id.get()

    async def main() -> tuple[Any, int, float]:
        request_id.set("req-1")
        ticker = Ticker()
        ticker.start()
        result = await sync_to_async(work)(1, b=2)
        return result, threading.get_ident(), ticker.stop()

    (total, worker_thread, seen_id), loop_thread, max_gap = asyncio.run(main())
    assert total == 3
    assert worker_thread != loop_thread
    assert seen_id == "req-1"  # the caller's contextvars
    assert max_gap < MAX_STALL, f"the loop stalled {max_gap:.3f}s"


def test_sync_to_async_raises_the_exception_of_func() -> None:
    def boom() -> None:
        raise KeyError("nope")

    async def main() -> None:
        await sync_to_async(boom)()

    with pytest.raises(KeyError, match="nope"):
        asyncio.run(main())


def test_sync_to_async_rejects_async_functions() -> None:
    async def already_async() -> None:
        pass

    with pytest.raises(TypeError):
        sync_to_async(already_async)  # type: ignore[arg-type]


def test_concurrent_calls_run_in_parallel() -> None:
    """Decided by a barrier, not a clock: 20 calls meet inside func at the same time,
    which only calls running in parallel can do (serialised: the barrier times out)."""
    meeting = threading.Barrier(20, timeout=10)

    async def main() -> list[int]:
        return await asyncio.gather(*(sync_to_async(meeting.wait)() for _ in range(20)))

    arrivals = asyncio.run(main())
    assert sorted(arrivals) == list(range(20))  # every call passed the barrier
    assert not meeting.broken


def test_native_pool_gives_a_burst_one_worker_per_job() -> None:
    """8 jobs on an 8-worker pool all run at once: they meet at a barrier of 8."""
    pool = NativeThreadPool(8, "burst-test")
    meeting = threading.Barrier(8, timeout=10)

    async def main() -> list[int]:
        return await asyncio.gather(*(pool.run(meeting.wait) for _ in range(8)))

    try:
        arrivals = asyncio.run(main())
    finally:
        pool.shutdown()
    assert sorted(arrivals) == list(range(8))
    assert not meeting.broken


def wait_in_loop(event: threading.Event, timeout: float = 10) -> Any:
    """An awaitable that ends when ``event`` (set by another thread) is set; bounded."""

    async def waiting() -> None:
        deadline = time.monotonic() + timeout
        while not event.is_set():
            assert time.monotonic() < deadline, "the event never came"
            await asyncio.sleep(0.005)

    return waiting()


def test_cancel_is_not_held_up_by_running_func() -> None:
    """func blocks until released (at most BLOCK s): the cancel must return while it
    still blocks. Held up by func, it would take BLOCK s, 4x the bound."""
    started, release, finished = threading.Event(), threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        release.wait(BLOCK)
        finished.set()

    async def main() -> float:
        task = asyncio.ensure_future(sync_to_async(slow)())
        await wait_in_loop(started)  # func is running: the order is the event's
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - start
        assert not finished.is_set()  # the cancel came back while func still blocked
        return took

    assert asyncio.run(main()) < MAX_STALL
    release.set()
    assert finished.wait(BLOCK + 3)  # func itself ran to its end, off the loop


class Recorder:
    """A sync generator that records how it ended."""

    def __init__(self, count: int, delay: float = 0.0, hang_at: int = -1, hang: float = 0.0):
        self.count, self.delay, self.hang_at, self.hang = count, delay, hang_at, hang
        self.ended_by: str | None = None
        self.finally_at: float | None = None
        self.threads: set[int] = set()
        # Before item ``hang_at`` it sets ``hanging`` and blocks until ``release`` is
        # set or ``hang`` seconds pass: tests order themselves by these events.
        self.hanging = threading.Event()
        self.release = threading.Event()

    def __iter__(self) -> Iterator[int]:
        try:
            for index in range(self.count):
                self.threads.add(threading.get_ident())
                if index == self.hang_at:
                    self.hanging.set()
                    self.release.wait(self.hang)
                else:
                    time.sleep(self.delay)
                yield index
            self.ended_by = "exhausted"
        except GeneratorExit:
            self.ended_by = "GeneratorExit"
            raise
        finally:
            self.finally_at = time.monotonic()


def test_iter_yields_everything_off_the_loop() -> None:
    rec = Recorder(5, hang_at=2, hang=BLOCK)  # item 2 takes BLOCK s to produce

    async def main() -> tuple[list[int], int, float]:
        ticker = Ticker()
        ticker.start()
        items = [item async for item in sync_to_async_iter(iter(rec))]
        return items, threading.get_ident(), ticker.stop()

    items, loop_thread, max_gap = asyncio.run(main())
    assert items == [0, 1, 2, 3, 4]
    assert rec.ended_by == "exhausted"
    assert loop_thread not in rec.threads
    assert max_gap < MAX_STALL, f"the loop stalled {max_gap:.3f}s"


def test_iter_accepts_any_iterable() -> None:
    async def main() -> list[str]:
        return [item async for item in sync_to_async_iter(["a", "b"])]

    assert asyncio.run(main()) == ["a", "b"]


def test_aclose_closes_the_generator_at_its_yield() -> None:
    rec = Recorder(100)

    async def main() -> list[int]:
        stream = sync_to_async_iter(iter(rec))
        items = [await stream.__anext__() for _ in range(3)]
        await stream.aclose()
        assert rec.finally_at is not None  # closed before aclose() returned
        return items

    assert asyncio.run(main()) == [0, 1, 2]
    assert rec.ended_by == "GeneratorExit"


def test_breaking_out_of_async_for_closes_the_generator() -> None:
    rec = Recorder(100)

    async def main() -> None:
        async def consume() -> None:
            async for item in sync_to_async_iter(iter(rec)):
                if item == 2:
                    raise ValueError("consumer failed")

        with pytest.raises(ValueError):
            await consume()
        for _ in range(100):  # the abandoned async generator is finalised by the loop
            if rec.finally_at is not None:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert rec.ended_by == "GeneratorExit"


def test_exception_in_the_generator_reaches_the_consumer() -> None:
    def broken() -> Iterator[int]:
        yield 1
        raise RuntimeError("generator failed")

    async def main() -> list[int]:
        seen = []
        async for item in sync_to_async_iter(broken()):
            seen.append(item)
        return seen

    with pytest.raises(RuntimeError, match="generator failed"):
        asyncio.run(main())


def test_cancel_while_next_blocks_returns_at_once_and_closes_later() -> None:
    """next() blocks until released (at most BLOCK s). The cancel returns while it
    blocks, the loop keeps ticking, and the generator is closed only after next()
    returns (it cannot be interrupted mid-call), at its yield."""
    rec = Recorder(100, hang_at=3, hang=BLOCK)
    items: list[int] = []

    async def main() -> tuple[float, float, bool, float]:
        async def consume() -> None:
            async for item in sync_to_async_iter(iter(rec)):
                items.append(item)

        ticker = Ticker()
        ticker.start()
        task = asyncio.ensure_future(consume())
        await wait_in_loop(rec.hanging)  # blocked inside next() for item 3
        cancel_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_in = time.monotonic() - cancel_at
        open_at_cancel = rec.finally_at is None  # still inside the blocked next()
        await asyncio.sleep(0.05)  # a few ticks with next() still blocked
        released_at = time.monotonic()
        rec.release.set()
        deadline = time.monotonic() + 10
        while rec.finally_at is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return cancelled_in, ticker.stop(), open_at_cancel, released_at

    cancelled_in, max_gap, open_at_cancel, released_at = asyncio.run(main())
    assert cancelled_in < MAX_STALL, "cancellation waited for the blocked next()"
    assert max_gap < MAX_STALL, "the loop was blocked while next() hung"
    assert open_at_cancel
    assert rec.ended_by == "GeneratorExit"  # closed at its yield once next() returned
    assert rec.finally_at is not None and rec.finally_at >= released_at
    assert items == [0, 1, 2]  # the item produced after the cancel was dropped


def test_cancel_between_items_closes_promptly() -> None:
    rec = Recorder(100)

    async def main() -> None:
        gate = asyncio.Event()

        async def consume() -> None:
            async for item in sync_to_async_iter(iter(rec)):
                if item == 2:
                    gate.set()
                    await asyncio.sleep(10)  # cancelled here, outside the iterator

        task = asyncio.ensure_future(consume())
        await gate.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if rec.finally_at is not None:
                return
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert rec.ended_by == "GeneratorExit"


# -- under the Flask test client (the loop thread, native workers) --------------


@pytest.fixture
def sync_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.setenv("CHATKIT_TEST_MARKER_DIR", str(tmp_path))
    return create_sync_app(
        f"sqlite:///{tmp_path / 'app.sqlite3'}", instance_path=str(tmp_path / "instance")
    )


def reply_text(events: list[Any]) -> str:
    return "".join(e.update.delta for e in events if isinstance(e, ThreadItemUpdatedEvent))


def test_respond_sees_flask_context_and_models_through_the_helper(sync_app: Flask) -> None:
    alice = login_as(sync_app, "alice")
    first = reply_text(alice.create_thread("op=work ctx=1 db=1 note=one"))
    assert first == "user=alice g=set-in-before-request path=/chatkit notes=1"
    second = reply_text(alice.create_thread("op=work db=1 note=two"))
    assert second == "notes=2"
    with sync_app.app_context():
        assert [n.text for n in db.session.scalars(db.select(Note).order_by(Note.id))] == [
            "one",
            "two",
        ]


def test_iter_streams_under_the_test_client(sync_app: Flask, tmp_path: Path) -> None:
    alice = login_as(sync_app, "alice")
    events = alice.create_thread("op=iter n=4 marker=done")
    assert reply_text(events) == "w0 w1 w2 w3 "
    assert (tmp_path / "done").read_text().startswith("exhausted")


def test_exception_in_func_is_an_error_event(sync_app: Flask) -> None:
    alice = login_as(sync_app, "alice")
    events = alice.create_thread("op=work fail=1")
    assert any(isinstance(e, ErrorEvent) for e in events)
    assert reply_text(alice.create_thread("op=work ctx=1")).startswith("user=alice")


def test_cancel_during_aclose_closes_once(caplog: pytest.LogCaptureFixture) -> None:
    finals: list[float] = []
    in_finally, release = threading.Event(), threading.Event()

    def slow_cleanup() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            in_finally.set()
            release.wait(BLOCK)
            finals.append(time.monotonic())

    async def main() -> None:
        stream = sync_to_async_iter(slow_cleanup())
        await stream.__anext__()
        closing = asyncio.ensure_future(stream.aclose())
        await wait_in_loop(in_finally)  # the generator's finally is running now
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        release.set()
        deadline = time.monotonic() + 10
        while not finals and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # room for a (wrong) second close to show up

    asyncio.run(main())
    assert len(finals) == 1
    assert "closing a sync iterator failed" not in caplog.text
