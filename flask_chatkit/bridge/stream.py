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

    def start(self) -> None:
        self._loop_thread.call_soon(self._create_task, context=self._context)

    def _create_task(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump())
        # A stopping worker cancels it in time to save the partial reply (lifecycle.py).
        self._loop_thread.open_streams.add(self._task)

    async def _pump(self) -> None:
        # StreamingResult only re-yields its generator: iterate that directly
        # (one async-generator hop less per event).
        source = getattr(self._source, "json_events", self._source)
        try:
            async for chunk in source:
                if not self._detached:
                    self._channel.put(chunk)
        except asyncio.CancelledError:
            self._channel.put(_END)
            raise
        except Exception as exc:
            logger.exception("ChatKit stream failed")
            self._channel.put(Failure(exc))
        else:
            self._channel.put(_END)

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
        if self._on_disconnect == "finish":
            self._detached = True  # run to completion; ChatKit persists as usual
            return
        self._loop_thread.call_soon(self._cancel, context=self._context)
        self._drain_until_end(self._cancel_timeout)

    def _cancel(self) -> None:
        # _create_task was scheduled first on the same FIFO loop, so the task exists.
        if self._task is not None:
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
