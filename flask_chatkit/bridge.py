"""Run ChatKit's async server from synchronous WSGI code.

One asyncio event loop per worker process runs forever on a native OS thread
(never a greenlet). Request handlers hand coroutines to it and wait on a
*channel* that wakes exactly the waiting greenlet (gevent) or thread (sync,
gthread, dev server), so a worker serves many streams at once.

Imports nothing of Flask: callers pass in the ``contextvars.Context`` whose
values (Flask's app/request contexts, Flask-Login's user) the coroutine sees.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import queue
import selectors
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from chatkit.errors import ErrorCode
from chatkit.types import ErrorEvent

from .threads import NativeThreadPool, gevent_patched, native_lock, start_native_thread

T = TypeVar("T")
logger = logging.getLogger("flask_chatkit")

PING = b": ping\n\n"
_END = object()  # the pump finished (normally, or after cancellation)
_TIMEOUT = object()  # no chunk within the heartbeat interval


@dataclass(frozen=True)
class Failure:
    """An exception raised on the loop, handed to the waiting request."""

    exc: BaseException


@dataclass(frozen=True)
class _Success:
    value: Any


def error_event_bytes(message: str | None = None) -> bytes:
    event = ErrorEvent(code=ErrorCode.STREAM_ERROR, message=message, allow_retry=False)
    return b"data: " + event.model_dump_json(exclude_none=True).encode() + b"\n\n"


# -- channels: loop thread -> waiting request --------------------------------


class _ThreadChannel:
    """For real threads: a blocking queue."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, item: Any) -> None:  # called on the loop thread
        self._queue.put(item)

    def get(self, timeout: float | None) -> Any:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return _TIMEOUT


class _GeventChannel:
    """For greenlets: the loop thread schedules the put on the waiter's hub.

    ``run_callback_threadsafe`` is the one gevent call that is safe from a
    foreign OS thread; the callback then wakes the greenlet blocked in ``get``.
    """

    def __init__(self) -> None:
        import gevent
        import gevent.queue

        self._hub_loop = gevent.get_hub().loop
        self._queue: Any = gevent.queue.Queue()

    def put(self, item: Any) -> None:
        self._hub_loop.run_callback_threadsafe(self._queue.put_nowait, item)

    def get(self, timeout: float | None) -> Any:
        import gevent.queue

        try:
            return self._queue.get(timeout=timeout)
        except gevent.queue.Empty:
            return _TIMEOUT


Channel = _ThreadChannel | _GeventChannel


def new_channel() -> Channel:
    return _GeventChannel() if gevent_patched() else _ThreadChannel()


# -- the per-process loop ----------------------------------------------------


class LoopThread:
    """A long-lived asyncio loop on a native thread, re-created after ``fork``."""

    def __init__(self, executor_workers: int = 16) -> None:
        self.executor_workers = executor_workers
        self._lock = native_lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        pid = os.getpid()
        if self._loop is None or self._pid != pid:  # first use, or a forked child
            with self._lock:
                if self._loop is None or self._pid != pid:
                    self._loop = self._start()
                    self._pid = pid
        return self._loop

    def _start(self) -> asyncio.AbstractEventLoop:
        # gevent replaces the default selector with one that would block this
        # native thread on the hub: ask for the unpatched one.
        selector_cls: Any = selectors.DefaultSelector
        if gevent_patched():
            from gevent import monkey

            selector_cls = monkey.get_original("selectors", "DefaultSelector")
        loop = asyncio.SelectorEventLoop(selector_cls())
        # asyncio.to_thread / getaddrinfo need threads that really run in parallel.
        loop.set_default_executor(NativeThreadPool(self.executor_workers, "chatkit-loop-executor"))

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()

        start_native_thread(run)
        return loop

    def call_soon(self, fn: Callable[..., Any], *args: Any, context: contextvars.Context) -> None:
        self.loop.call_soon_threadsafe(fn, *args, context=context)

    def run(
        self,
        make_coro: Callable[[], Awaitable[T]],
        context: contextvars.Context,
        timeout: float | None = None,
    ) -> T:
        """Run a coroutine on the loop and block this greenlet/thread until it ends."""
        channel = new_channel()

        async def runner() -> None:
            try:
                channel.put(_Success(await make_coro()))
            except BaseException as exc:  # re-raised in the caller
                channel.put(Failure(exc))

        self.call_soon(lambda: asyncio.ensure_future(runner()), context=context)
        outcome = channel.get(timeout)
        if outcome is _TIMEOUT:
            raise TimeoutError("the ChatKit event loop did not answer in time")
        if isinstance(outcome, Failure):
            raise outcome.exc
        return outcome.value  # type: ignore[no-any-return]


# -- streaming ---------------------------------------------------------------

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
        self._pending: list[Any] = []

    def start(self) -> None:
        self._loop_thread.call_soon(self._create_task, context=self._context)

    def _create_task(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for chunk in self._source:
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

    def first(self) -> Any:
        """The first chunk, a :class:`Failure`, or None when the stream ended empty."""
        item = self._channel.get(self._heartbeat)
        if item is _END:
            self._finished = True
            return None
        if isinstance(item, Failure):
            self._finished = True
        else:  # a chunk, or silence: send a heartbeat so headers go out now
            self._pending.append(PING if item is _TIMEOUT else item)
        return item

    def __iter__(self) -> Iterator[bytes]:
        try:
            while self._pending:
                yield self._pending.pop(0)
            while not self._finished:
                item = self._channel.get(self._heartbeat)
                if item is _TIMEOUT:
                    yield PING
                elif item is _END:
                    self._finished = True
                elif isinstance(item, Failure):
                    self._finished = True
                    yield error_event_bytes()
                else:
                    yield item
        finally:
            self.close()

    def close(self) -> None:
        if self._finished:
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
            item = self._channel.get(remaining)
            if item is _END or isinstance(item, Failure) or item is _TIMEOUT:
                return
        logger.warning("ChatKit stream did not finish within CHATKIT_CANCEL_TIMEOUT after cancel")
