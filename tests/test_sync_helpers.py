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
from flask_chatkit.testing import ChatKitClient

from .sync_app import Note, create_sync_app, db

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


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
        time.sleep(0.3)
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
    assert max_gap < 0.1, f"the loop stalled {max_gap:.3f}s"


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
    async def main() -> float:
        start = time.monotonic()
        await asyncio.gather(*(sync_to_async(time.sleep)(0.4) for _ in range(20)))
        return time.monotonic() - start

    elapsed = asyncio.run(main())
    assert elapsed < 1.2, f"20 x 0.4 s took {elapsed:.2f}s: calls were serialised"


def test_native_pool_gives_a_burst_one_worker_per_job() -> None:
    pool = NativeThreadPool(8, "burst-test")

    async def main() -> float:
        start = time.monotonic()
        await asyncio.gather(*(pool.run(time.sleep, 0.3) for _ in range(8)))
        return time.monotonic() - start

    try:
        elapsed = asyncio.run(main())
    finally:
        pool.shutdown()
    assert elapsed < 0.8, f"8 x 0.3 s on 8 workers took {elapsed:.2f}s"


def test_cancel_is_not_held_up_by_running_func() -> None:
    finished = threading.Event()

    def slow() -> None:
        time.sleep(1.0)
        finished.set()

    async def main() -> float:
        task = asyncio.ensure_future(sync_to_async(slow)())
        await asyncio.sleep(0.1)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - start

    assert asyncio.run(main()) < 0.1
    assert not finished.is_set()
    assert finished.wait(3)  # func itself ran to its end, off the loop


class Recorder:
    """A sync generator that records how it ended."""

    def __init__(self, count: int, delay: float = 0.0, hang_at: int = -1, hang: float = 0.0):
        self.count, self.delay, self.hang_at, self.hang = count, delay, hang_at, hang
        self.ended_by: str | None = None
        self.finally_at: float | None = None
        self.threads: set[int] = set()

    def __iter__(self) -> Iterator[int]:
        try:
            for index in range(self.count):
                self.threads.add(threading.get_ident())
                time.sleep(self.hang if index == self.hang_at else self.delay)
                yield index
            self.ended_by = "exhausted"
        except GeneratorExit:
            self.ended_by = "GeneratorExit"
            raise
        finally:
            self.finally_at = time.monotonic()


def test_iter_yields_everything_off_the_loop() -> None:
    rec = Recorder(5, delay=0.05)

    async def main() -> tuple[list[int], int, float]:
        ticker = Ticker()
        ticker.start()
        items = [item async for item in sync_to_async_iter(iter(rec))]
        return items, threading.get_ident(), ticker.stop()

    items, loop_thread, max_gap = asyncio.run(main())
    assert items == [0, 1, 2, 3, 4]
    assert rec.ended_by == "exhausted"
    assert loop_thread not in rec.threads
    assert max_gap < 0.1


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
    rec = Recorder(100, delay=0.01, hang_at=3, hang=1.0)
    items: list[int] = []

    async def main() -> tuple[float, float, float]:
        async def consume() -> None:
            async for item in sync_to_async_iter(iter(rec)):
                items.append(item)

        ticker = Ticker()
        ticker.start()
        task = asyncio.ensure_future(consume())
        while len(items) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # now blocked inside next() for item 3
        cancel_at = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled_in = time.monotonic() - cancel_at
        for _ in range(300):  # bounded: the blocked next() ends ~0.9 s later
            if rec.finally_at is not None:
                break
            await asyncio.sleep(0.01)
        return cancelled_in, ticker.stop(), cancel_at

    cancelled_in, max_gap, cancel_at = asyncio.run(main())
    assert cancelled_in < 0.1, "cancellation waited for the blocked next()"
    assert max_gap < 0.1, "the loop was blocked while next() hung"
    assert rec.ended_by == "GeneratorExit"  # closed at its yield once next() returned
    assert rec.finally_at is not None and rec.finally_at - cancel_at > 0.5
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


def chat_as(app: Flask, user: str) -> ChatKitClient:
    client = app.test_client()
    assert client.post(f"/login/{user}").status_code == 200
    return ChatKitClient(client)


def test_respond_sees_flask_context_and_models_through_the_helper(sync_app: Flask) -> None:
    alice = chat_as(sync_app, "alice")
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
    alice = chat_as(sync_app, "alice")
    events = alice.create_thread("op=iter n=4 marker=done")
    assert reply_text(events) == "w0 w1 w2 w3 "
    assert (tmp_path / "done").read_text().startswith("exhausted")


def test_exception_in_func_is_an_error_event(sync_app: Flask) -> None:
    alice = chat_as(sync_app, "alice")
    events = alice.create_thread("op=work fail=1")
    assert any(isinstance(e, ErrorEvent) for e in events)
    assert reply_text(alice.create_thread("op=work ctx=1")).startswith("user=alice")


def test_cancel_during_aclose_closes_once(caplog: pytest.LogCaptureFixture) -> None:
    finals: list[float] = []

    def slow_cleanup() -> Iterator[int]:
        try:
            yield from range(100)
        finally:
            time.sleep(0.3)
            finals.append(time.monotonic())

    async def main() -> None:
        stream = sync_to_async_iter(slow_cleanup())
        await stream.__anext__()
        closing = asyncio.ensure_future(stream.aclose())
        await asyncio.sleep(0.1)  # the generator's finally is running now
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await asyncio.sleep(0.5)

    asyncio.run(main())
    assert len(finals) == 1
    assert "closing a sync iterator failed" not in caplog.text
