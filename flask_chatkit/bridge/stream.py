"""Stream an async byte source from the loop to a WSGI response, with cancel.

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import AsyncIterable, Iterator
from typing import Any, Literal

from chatkit.errors import ErrorCode
from chatkit.types import ErrorEvent

from .channels import TIMEOUT, new_channel
from .loop import Failure, LoopThread

logger = logging.getLogger("flask_chatkit")

PING = b": ping\n\n"
_END = object()  # the pump finished (normally, or after cancellation)
# Bytes a stream may hold for a reader that has not taken them yet; past it the
# pump (and so ChatKit's stream) waits until the reader catches up.
MAX_BUFFERED_BYTES = 256 * 1024


def error_event_bytes() -> bytes:
    """What a stream that failed after it started sends last (details go to the log)."""
    event = ErrorEvent(code=ErrorCode.STREAM_ERROR, allow_retry=False)
    return b"data: " + event.model_dump_json(exclude_none=True).encode() + b"\n\n"


def _is_final(item: Any) -> bool:
    return item is _END or isinstance(item, Failure)


OnDisconnect = Literal["cancel", "finish"]


class Stream:
    """Pumps an async byte stream on the loop into a channel a request reads.

    ``start()`` schedules the pump; ``first()`` waits for the first chunk so a
    failure before any byte is sent can still become a plain HTTP error;
    iterating yields chunks (and heartbeats); ``close()`` is what WSGI calls on
    disconnect: it cancels the pump task so ChatKit's ``handle_stream_cancelled``
    runs, or lets it finish when ``on_disconnect == "finish"``.
    """

    def __init__(
        self,
        loop_thread: LoopThread,
        source: AsyncIterable[bytes],
        context: contextvars.Context,
        *,
        heartbeat: float,
        cancel_timeout: float,
        on_disconnect: OnDisconnect = "cancel",
        max_buffered: int = MAX_BUFFERED_BYTES,
    ) -> None:
        self._loop_thread = loop_thread
        self._source = source
        self._context = context
        self._heartbeat = heartbeat if heartbeat > 0 else None
        self._cancel_timeout = cancel_timeout
        self._on_disconnect = on_disconnect
        self._channel = new_channel()
        self._task: asyncio.Task[None] | None = None
        self._detached = False  # the reader left and the pump should stop queuing
        self._finished = False
        self._queued: collections.deque[Any] = collections.deque()
        # Backpressure. Each counter has one writer (the pump / the reader), so
        # neither needs a lock; the pump parks on ``_drained`` (a loop-side
        # Event) only once the difference crosses ``_max_buffered``.
        self._max_buffered = max_buffered
        self._produced = 0
        self._consumed = 0
        self._drained = asyncio.Event()
        self._parked = False  # the pump waits on _drained (read by the reader)
        self._cancel_when_resumed = False

    def start(self) -> None:
        self._loop_thread.call_soon(self._create_task, context=self._context)

    def _create_task(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        # StreamingResult only re-yields its generator: iterate that directly
        # (one async-generator hop less per event).
        source = getattr(self._source, "json_events", self._source)
        try:
            async for chunk in source:
                if self._detached:
                    continue
                self._channel.put(chunk)
                self._produced += len(chunk)
                if self._produced - self._consumed > self._max_buffered:
                    await self._wait_for_reader()
        except asyncio.CancelledError:
            self._channel.put(_END)
            raise
        except Exception as exc:
            logger.exception("ChatKit stream failed")
            self._channel.put(Failure(exc))
        else:
            self._channel.put(_END)

    def _over_budget(self) -> bool:
        return not self._detached and self._produced - self._consumed > self._max_buffered

    async def _wait_for_reader(self) -> None:
        """Park between two events until the reader has taken what is buffered.

        The reader wakes us once it takes a batch (see ``_taken``); ``_parked``
        is set before the re-check, so a batch taken in between is never missed.
        A disconnect wakes us too: finish mode then runs on without a reader,
        and a cancel is re-aimed inside ChatKit (see ``_cancel``).
        """
        while self._over_budget():
            self._drained.clear()
            self._parked = True
            try:
                if self._over_budget():
                    await self._drained.wait()
            finally:
                self._parked = False
        if self._cancel_when_resumed:
            # Raised at ChatKit's next await, where handle_stream_cancelled runs
            # (a CancelledError here, between events, would skip it).
            task = asyncio.current_task()
            assert task is not None
            task.cancel()

    def _wake_pump(self) -> None:
        self._drained.set()

    def _taken(self, batch: list[Any]) -> None:
        """The reader took ``batch`` off the channel: count it, wake a parked pump."""
        self._consumed += sum(len(item) for item in batch if isinstance(item, bytes))
        if self._parked and self._produced - self._consumed <= self._max_buffered:
            self._loop_thread.call_soon(self._wake_pump, context=self._context)

    def _next_write(self) -> bytes | Failure | None:
        """Everything that is ready, joined into one write; None at the end.

        Silence for a heartbeat interval yields a ping; a failure is returned
        as is once the chunks before it have been written.
        """
        while True:
            if self._queued:
                item = self._queued.popleft()
                if item is _END:
                    self._finished = True
                    return None
                if isinstance(item, Failure):
                    self._finished = True
                    return item
                chunks = [item]
                while self._queued and isinstance(self._queued[0], bytes):
                    chunks.append(self._queued.popleft())
                return b"".join(chunks)
            batch = self._channel.get_batch(self._heartbeat)
            if batch is TIMEOUT:
                return PING
            assert isinstance(batch, list)
            self._taken(batch)
            self._queued.extend(batch)

    def first(self) -> bytes | Failure | None:
        """The first write, so a failure before any byte can become an HTTP error."""
        write = self._next_write()
        if isinstance(write, bytes):
            self._queued.appendleft(write)
        return write

    def __iter__(self) -> Iterator[bytes]:
        try:
            while not self._finished or self._queued:
                write = self._next_write()
                if write is None:
                    return
                if isinstance(write, Failure):
                    yield error_event_bytes()
                    return
                yield write
        finally:
            self.close()

    def close(self) -> None:
        if self._finished or any(_is_final(item) for item in self._queued):
            self._finished = True  # the pump already ended: nothing to cancel
            return
        self._finished = True
        self._detached = True  # nobody reads any more: the pump stops queuing
        if self._on_disconnect == "finish":
            # Run to completion; ChatKit persists as usual. A parked pump resumes.
            self._loop_thread.call_soon(self._wake_pump, context=self._context)
            return
        self._loop_thread.call_soon(self._cancel, context=self._context)
        self._drain_until_end(self._cancel_timeout)

    def _cancel(self) -> None:
        # _create_task was scheduled first on the same FIFO loop, so the task exists.
        if self._parked:
            # Parked between events, outside ChatKit: resume it and cancel at
            # its next await inside ChatKit instead.
            self._cancel_when_resumed = True
            self._drained.set()
        elif self._task is not None:
            self._task.cancel()

    def _drain_until_end(self, timeout: float) -> None:
        # Wait (bounded) so the partial reply is persisted before the worker
        # moves on or exits; chunks produced meanwhile have nowhere to go.
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            batch = self._channel.get_batch(remaining)
            if not isinstance(batch, list):
                break
            if any(_is_final(item) for item in batch):
                return
        logger.warning("ChatKit stream did not finish within CHATKIT_CANCEL_TIMEOUT after cancel")
