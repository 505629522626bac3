"""``Stream.start(prepare)``: one task runs the set-up and then pumps (unit level, no server)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator

from flask_chatkit.bridge.loop import LoopThread, Outcome
from flask_chatkit.bridge.stream import Stream

_LOOP: LoopThread | None = None


def open_tasks() -> set[asyncio.Task[object]]:
    assert _LOOP is not None
    return _LOOP.open_streams._tasks


def new_stream(loop_thread: LoopThread) -> Stream:
    return Stream(loop_thread, None, contextvars.copy_context(), heartbeat=0, cancel_timeout=5)


async def three_chunks(registered: list[bool] | None = None) -> AsyncIterator[bytes]:
    for n in range(3):
        await asyncio.sleep(0)
        if registered is not None and n == 0:
            registered.append(asyncio.current_task() in open_tasks())
        yield b"data: %d\n\n" % n


def test_prepare_then_pump_in_one_task(loop_thread: LoopThread) -> None:
    global _LOOP
    _LOOP = loop_thread
    tasks: list[asyncio.Task[object] | None] = []
    registered: list[bool] = []

    async def prepare() -> AsyncIterator[bytes]:
        tasks.append(asyncio.current_task())
        # Not an open stream while it only prepares (as before: deploys cancel streams).
        registered.append(asyncio.current_task() in open_tasks())
        await asyncio.sleep(0)
        return three_chunks(registered)

    stream = new_stream(loop_thread)
    stream.start(prepare)
    first = stream.first()
    assert isinstance(first, bytes) and first.startswith(b"data: 0")
    assert b"".join(stream) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert tasks[0] is stream._task  # one task prepared and pumped
    # Registered for deploys (a stopping worker cancels it) once it streams.
    assert registered == [False, True]


def test_a_failing_prepare_reaches_the_reader_before_any_byte(loop_thread: LoopThread) -> None:
    async def prepare() -> AsyncIterator[bytes]:
        raise LookupError("thread not found")

    stream = new_stream(loop_thread)
    stream.start(prepare)
    first = stream.first()
    assert isinstance(first, Outcome) and isinstance(first.error, LookupError)


def test_a_plain_result_ends_the_stream_at_once(loop_thread: LoopThread) -> None:
    async def prepare() -> Outcome:
        return Outcome({"ok": True})

    stream = new_stream(loop_thread)
    stream.start(prepare)
    first = stream.first()
    assert first == Outcome({"ok": True})
    assert list(stream) == []
