"""Stream an async byte source from the loop to a WSGI response, with cancel.

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from chatkit.errors import ErrorCode
from chatkit.types import ErrorEvent

from .loop import TIMEOUT, LoopThread, Outcome, new_channel
from .native import native_lock

logger = logging.getLogger("flask_chatkit")

PING = b": ping\n\n"
# ChatKit turns an exception inside respond into this event and ends the stream.
ERROR_EVENT_PREFIX = b'data: {"type":"error"'
_END = object()  # the pump finished normally
_CANCELLED = object()  # the pump ended because its task was cancelled
# Bytes a stream may hold for a reader that has not taken them yet; past it the
# pump (and so ChatKit's stream) waits until the reader catches up.
MAX_BUFFERED_BYTES = 256 * 1024


def error_event_bytes() -> bytes:
    """What a stream that failed after it started sends last (details go to the log)."""
    event = ErrorEvent(code=ErrorCode.STREAM_ERROR, allow_retry=False)
    return b"data: " + event.model_dump_json(exclude_none=True).encode() + b"\n\n"


# Run on the loop by the stream's own task before it pumps: returns the source to
# stream, or an Outcome (a plain result) that ends the stream at once (see Stream.start).
Prepare = Callable[[], Awaitable["AsyncIterable[bytes] | Outcome"]]


def _is_final(item: Any) -> bool:
    # An Outcome ends a stream: a plain result of ``prepare``, or a failure.
    return item is _END or item is _CANCELLED or isinstance(item, Outcome)


OnDisconnect = Literal["cancel", "finish"]
StreamEnd = Literal["finished", "cancelled", "failed"]


@dataclass(slots=True)  # one per open stream: no per-instance dict
class StreamStats:
    """What one stream did; counted cheaply as it runs, read once at its end."""

    started: float  # time.monotonic() when the Stream was created
    first_event: float | None = None  # when the first write was ready
    ended: float | None = None
    events: int = 0  # chunks from the source (one SSE event each); pings not counted
    bytes_sent: int = 0
    # The last two writes: ChatKit's error event is at most two events before the end.
    tail: tuple[bytes, bytes] = (b"", b"")

    @property
    def error_event(self) -> bytes | None:
        """The ChatKit error event near the end of the stream, if it ended with one."""
        for write in self.tail:
            start = write.rfind(ERROR_EVENT_PREFIX)
            if start >= 0:
                end = write.find(b"\n\n", start)
                return write[start : end if end >= 0 else len(write)]
        return None

    @property
    def duration(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def time_to_first_event(self) -> float | None:
        return None if self.first_event is None else self.first_event - self.started


# Called exactly once per iterated stream: (outcome, stats, exception or None).
# A failure ChatKit itself turned into an error event comes with None (and
# ``stats.error_event``): the SDK keeps the exception.
OnEnd = Callable[[StreamEnd, StreamStats, BaseException | None], None]


class Stream:
    """Pumps an async byte stream on the loop into a channel a request reads.

    ``start()`` schedules the pump; ``first()`` waits for the first chunk so a
    failure before any byte is sent can still become a plain HTTP error;
    iterating yields chunks (and heartbeats); ``close()`` is what WSGI calls on
    disconnect: it cancels the pump task so ChatKit's ``handle_stream_cancelled``
    runs, or lets it finish when ``on_disconnect == "finish"``.

    ``on_end`` (optional) hears how the stream ended, once: in the reader's
    thread/greenlet when it ends while read (finished, failed, cancelled on
    disconnect), or on a native executor thread when a detached stream
    (``"finish"``) completes later.
    """

    __slots__ = (
        "_cancel_timeout", "_cancelling", "_channel", "_consumed", "_context", "_detached",
        "_drained", "_end_claimed", "_final", "_finished", "_heartbeat", "_loop_thread",
        "_max_buffered", "_on_disconnect", "_on_end", "_parked", "_prepare", "_produced",
        "_queued", "_source", "_task", "stats",
    )  # fmt: skip

    def __init__(
        self,
        loop_thread: LoopThread,
        source: AsyncIterable[bytes] | None,
        context: contextvars.Context,
        *,
        heartbeat: float,
        cancel_timeout: float,
        on_disconnect: OnDisconnect = "cancel",
        on_end: OnEnd | None = None,
        started: float | None = None,
        max_buffered: int = MAX_BUFFERED_BYTES,
    ) -> None:
        self._loop_thread = loop_thread
        self._source = source
        self._context = context
        self._heartbeat = heartbeat if heartbeat > 0 else None
        self._cancel_timeout = cancel_timeout
        self._on_disconnect = on_disconnect
        self._channel = new_channel()
        self._prepare: Prepare | None = None
        self._task: asyncio.Task[None] | None = None
        self._detached = False  # the reader left and the pump should stop queuing
        self._finished = False
        # Taken from the channel, not yet written (a list: an empty deque is 760 bytes).
        self._queued: list[Any] = []
        self._on_end = on_end
        self._end_claimed = native_lock()  # taken by the one report of the end
        self._final: Any = None  # the pump's last item, once the reader took it
        self.stats = StreamStats(started=time.monotonic() if started is None else started)
        # Backpressure. Each counter has one writer (the pump / the reader), so
        # neither needs a lock; the pump parks on ``_drained`` (a loop-side
        # Event, made the first time: most streams never park) only once the
        # difference crosses ``_max_buffered``.
        self._max_buffered = max_buffered
        self._produced = 0
        self._consumed = 0
        self._drained: asyncio.Event | None = None
        self._parked = False  # the pump waits on _drained (read by the reader)
        self._cancelling = False  # a cancel was re-aimed at ChatKit: never park again

    def start(self, prepare: Prepare | None = None) -> None:
        """Schedule the stream's task on the loop.

        With ``prepare`` the same task first awaits it (e.g. checks and
        ``server.process()``) and then pumps the source it returns: one hop to
        the loop and one wake-up back for the first chunk, a failure of
        ``prepare`` or its plain result (an :class:`Outcome`), instead of a round trip for the
        result and another one for the first chunk.
        """
        self._prepare = prepare
        self._loop_thread.call_soon(self._create_task, context=self._context)

    def _create_task(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        if self._prepare is not None:
            try:
                prepared = await self._prepare()
            except BaseException as exc:  # no byte sent yet: the reader raises it
                self._channel.put(Outcome(error=exc))
                return
            if isinstance(prepared, Outcome):
                self._channel.put(prepared)
                return
            self._source = prepared
        # A stopping worker cancels it in time to save the partial reply (lifecycle.py).
        assert self._task is not None
        self._loop_thread.open_streams.add(self._task)
        await self._pump()

    async def _pump(self) -> None:
        # StreamingResult only re-yields its generator: iterate that directly
        # (one async-generator hop less per event).
        source = getattr(self._source, "json_events", self._source)
        assert source is not None
        try:
            async for chunk in source:  # per event: the hand-over and a byte count
                if self._detached:
                    continue
                self._channel.put(chunk)
                self._produced += len(chunk)
                if self._produced - self._consumed > self._max_buffered:
                    await self._wait_for_reader()
        except asyncio.CancelledError:
            self._channel.put(_CANCELLED)
            self._report_detached(*self._outcome_of(_CANCELLED))
            raise
        except Exception as exc:
            logger.exception("ChatKit stream failed")
            self._channel.put(Outcome(error=exc))
            self._report_detached("failed", exc)
        else:
            self._channel.put(_END)
            self._report_detached(*self._outcome_of(_END))

    def _over_budget(self) -> bool:
        return (
            not self._detached
            and not self._cancelling
            and self._produced - self._consumed > self._max_buffered
        )

    async def _wait_for_reader(self) -> None:
        """Park between two events until the reader has taken what is buffered.

        The reader wakes us once it takes a batch (see ``_taken``); ``_parked``
        is set before the re-check, so a batch taken in between is never missed.
        A disconnect in finish mode wakes us to run on without a reader.
        """
        while self._over_budget():
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            self._parked = True
            try:
                if self._over_budget():
                    await self._drained.wait()
            except asyncio.CancelledError:
                # Cancelled while parked between events (a disconnect, a stopping
                # worker): raised here, ChatKit's handle_stream_cancelled would not
                # run. Re-aim the cancel at ChatKit's next await instead.
                self._cancelling = True
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
                return
            finally:
                self._parked = False

    def _wake_pump(self) -> None:
        if self._drained is not None:
            self._drained.set()

    def _taken(self, batch: list[Any]) -> None:
        """The reader took ``batch`` off the channel: count it, wake a parked pump."""
        self._consumed += sum(len(item) for item in batch if isinstance(item, bytes))
        if self._parked and self._produced - self._consumed <= self._max_buffered:
            self._loop_thread.call_soon(self._wake_pump, context=self._context)

    def _report_detached(self, outcome: StreamEnd, exc: BaseException | None) -> None:
        # A detached stream has no reader left to report its end: do it off the
        # loop (receivers may block) on the loop's native executor.
        if self._detached and self._on_end is not None:
            asyncio.get_running_loop().run_in_executor(None, self._end, outcome, exc)

    def _outcome_of(self, item: Any) -> tuple[StreamEnd, BaseException | None]:
        if isinstance(item, Outcome):
            return ("finished", None) if item.error is None else ("failed", item.error)
        if item is _CANCELLED:
            return "cancelled", None
        # ChatKit caught an error in respond and sent an error event: a failure too.
        return ("failed" if self.stats.error_event is not None else "finished"), None

    def _end(self, outcome: StreamEnd, exc: BaseException | None) -> None:
        """Report the end once; a failing callback is logged, never raised."""
        on_end = self._on_end
        # The reader and (when detached) the loop's executor may both get here.
        if on_end is None or not self._end_claimed.acquire(blocking=False):
            return
        self.stats.ended = time.monotonic()
        try:
            on_end(outcome, self.stats, exc)
        except Exception:
            logger.exception("ChatKit stream end callback failed")

    def _next_write(self) -> bytes | Outcome | None:
        """Everything that is ready, joined into one write; None at the end.

        Silence for a heartbeat interval yields a ping; a failure (or a
        ``prepare`` step's plain result) is returned as is once the chunks
        before it have been written.
        """
        while True:
            queued = self._queued
            if queued:
                item = queued[0]
                if _is_final(item):
                    del queued[0]
                    self._finished = True
                    self._final = item  # reported by close(), after the last write
                    return item if isinstance(item, Outcome) else None
                end = 1
                while end < len(queued) and isinstance(queued[end], bytes):
                    end += 1
                write = item if end == 1 else b"".join(queued[:end])
                del queued[:end]
                # Counted per write (a batch of events), not per event.
                stats = self.stats
                stats.events += end
                stats.bytes_sent += len(write)
                stats.tail = (stats.tail[1], write)
                return write
            batch = self._channel.get_batch(self._heartbeat)
            if batch is TIMEOUT:
                return PING
            assert isinstance(batch, list)
            self._taken(batch)
            self._queued = batch

    def first(self) -> bytes | Outcome | None:
        """The first write, so a failure before any byte can become an HTTP error.

        After ``start(prepare)`` it may also be the plain result of ``prepare``.
        """
        write = self._next_write()
        stats = self.stats
        stats.first_event = time.monotonic()
        if isinstance(write, bytes):
            self._queued.insert(0, write)
            # Re-taken as one more chunk by the first iteration: count it only then.
            stats.events -= 1
            stats.bytes_sent -= len(write)
        return write

    # An iterator, not a generator: a greenlet waiting for the next write keeps its
    # C stack on the heap, and each generator level between gunicorn's write loop
    # and the wait adds ~400 bytes to it (see ContextKeepingBody).
    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        """The next write (joined events, or a ping); closes the stream at its end."""
        try:
            write = None if self._finished and not self._queued else self._next_write()
            if write is None:
                raise StopIteration
            if isinstance(write, Outcome):
                if write.error is None:  # a plain result: nothing to stream
                    raise StopIteration
                self._end("failed", write.error)  # before the write a gone client may stop
                return error_event_bytes()  # and the stream is finished: the next call ends
            return write
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._finished:
            if self._final is not None:
                self._end(*self._outcome_of(self._final))
            return
        for item in self._queued:  # the pump already ended: nothing to cancel
            if _is_final(item):
                self._finished = True
                self._end(*self._outcome_of(item))
                return
        self._finished = True
        if self._on_disconnect == "finish":
            self._detached = True  # run to completion; ChatKit persists as usual
            self._loop_thread.call_soon(self._wake_pump, context=self._context)  # if parked
            # An end that arrived before the flag was set is reported here;
            # later ones by the pump itself (_report_detached).
            batch = self._channel.get_batch(0)
            for item in batch if isinstance(batch, list) else ():
                if _is_final(item):
                    self._end(*self._outcome_of(item))
            return
        self._loop_thread.call_soon(self._cancel, context=self._context)
        self._drain_until_end(self._cancel_timeout)
        self._end("cancelled", None)

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
