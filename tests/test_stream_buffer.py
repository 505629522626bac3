"""The stream's buffer is bounded: the pump waits for the reader (unit level, no server)."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator

from flask_chatkit.bridge.loop import LoopThread
from flask_chatkit.bridge.stream import Stream

CHUNK = b"x" * 10_000
BOUND = 50_000


class Source:
    """100 chunks of 10 kB; records how far it got and whether a cancel reached it."""

    def __init__(self) -> None:
        self.produced = 0
        self.cancelled_inside = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            for _ in range(100):
                await asyncio.sleep(0)  # where a cancel must land (ChatKit awaits here)
                self.produced += 1
                yield CHUNK
        except asyncio.CancelledError:
            self.cancelled_inside = True
            raise


def start(loop_thread: LoopThread, source: Source, mode: str = "cancel") -> Stream:
    stream = Stream(
        loop_thread,
        source,  # type: ignore[arg-type]
        contextvars.copy_context(),
        heartbeat=0,
        cancel_timeout=5,
        on_disconnect=mode,  # type: ignore[arg-type]
        max_buffered=BOUND,
    )
    stream.start()
    first = stream.first()
    assert isinstance(first, bytes) and first.startswith(CHUNK)
    return stream


async def _turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def settle(loop_thread: LoopThread, source: Source, turns: int = 1000) -> int:
    """How far the source got after ``turns`` turns of the event loop.

    Decided by loop turns, not a clock: the source produces a chunk per turn it is
    given, so a pump that never pauses has produced all 100 chunks within these
    1000 turns, however slowly a busy machine runs them (a starved loop only makes
    the wait longer, never the answer different)."""
    future = asyncio.run_coroutine_threadsafe(_turns(turns), loop_thread.loop)
    future.result(timeout=60)
    return source.produced


def test_the_pump_pauses_at_the_bound_and_resumes_when_read(loop_thread: LoopThread) -> None:
    source = Source()
    stream = start(loop_thread, source)
    # Unbounded, all 100 chunks (1 MB) would be queued by now.
    paused_at = settle(loop_thread, source)
    # At most the bound (plus the chunk that crossed it) past what first() took.
    assert paused_at <= 2 * (BOUND // len(CHUNK) + 1), paused_at
    body = b"".join(stream)
    assert source.produced == 100 and len(body) == 100 * len(CHUNK)


def test_a_cancel_while_paused_lands_inside_the_source(loop_thread: LoopThread) -> None:
    source = Source()
    stream = start(loop_thread, source)
    assert settle(loop_thread, source) < 100
    stream.close()  # what WSGI calls on a disconnect
    assert source.cancelled_inside
    assert source.produced < 100


def test_finish_mode_resumes_a_paused_pump_after_disconnect(loop_thread: LoopThread) -> None:
    source = Source()
    stream = start(loop_thread, source, "finish")
    assert settle(loop_thread, source) < 100
    stream.close()
    deadline = time.monotonic() + 5
    while source.produced < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert source.produced == 100 and not source.cancelled_inside
