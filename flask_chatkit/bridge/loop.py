"""The per-process asyncio loop that runs ChatKit for synchronous WSGI code.

One asyncio event loop per worker process runs forever: under a gevent worker as
a greenlet on the hub's own thread (:mod:`.hub_loop`), elsewhere (sync, gthread,
the dev server) on a native OS thread. Request handlers hand coroutines to it
and wait on a *channel* that wakes exactly the waiting greenlet or thread, so a
worker serves many streams at once. What comes back is an :class:`Outcome`: the
coroutine's value or the exception it raised.

``CHATKIT_LOOP = "thread"`` puts the loop on a native thread under gevent too
(:meth:`LoopThread.prefer_native_thread`): for a ``respond`` that makes native
blocking calls (a C extension that never yields to gevent), which would otherwise
stall the hub and every request of the worker, not only the streams.

:func:`run_inline` is the other way to run a coroutine: on the caller's own
greenlet or thread, with no loop at all, for coroutines that never wait on one
(see ``web/endpoint.py`` for when the view may use it). It saves the two thread
hand-offs of a round trip to the loop.

Imports nothing of Flask: callers pass in the ``contextvars.Context`` whose
values (Flask's app/request contexts, Flask-Login's user) the coroutine sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import queue
import selectors
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
from gevent.hub import Waiter

from .hub import attach_hub
from .hub_loop import HubLoop
from .native import (
    NativeThreadPool,
    gevent_patched,
    native_lock,
    native_thread_id,
    start_native_thread,
)

T = TypeVar("T")
logger = logging.getLogger("flask_chatkit")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How work handed across threads ended: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


class NeedsLoop(Exception):
    """:func:`run_inline` met an await that only an event loop can answer."""


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end right here, on the calling greenlet or thread.

    Only for coroutines whose awaits all complete without a loop, e.g.
    ``SQLAlchemyStore`` reads, which answer synchronously when no loop is running.
    If one suspends anyway, it is closed and :class:`NeedsLoop` raised: the caller
    runs the work on the loop instead (so only work that is safe to start again,
    such as reads, belongs here).
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise NeedsLoop(getattr(coro, "__qualname__", "coroutine"))


# -- channels: the loop hands values to one waiting greenlet or thread --------------
# A channel has one producer (the loop) and one consumer (the request).
# ``get_batch`` returns everything queued so far, so a burst of stream chunks costs
# one wake-up and one socket write instead of one per chunk; under gevent the
# producer also schedules at most one wake-up until the consumer drains.

TIMEOUT = object()  # nothing arrived within the timeout


class ThreadChannel:
    """For real threads (sync, gthread, dev server): a blocking queue."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def put(self, item: Any) -> None:
        self._queue.put(item)

    def get_batch(self, timeout: float | None) -> list[Any] | object:
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return TIMEOUT
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return batch


class GeventChannel:
    """For greenlets: the producer wakes the consumer's hub, thread-safely if need be.

    From the hub's own thread (the loop as a greenlet there) a plain
    ``run_callback`` does; from a foreign OS thread (the loop on a thread of its
    own) ``run_callback_threadsafe``, the one gevent call that is safe there. The
    callback switches straight to the waiting greenlet through a ``Waiter`` (an
    ``Event`` would add its link notification and a second hub callback to every
    wake-up). No lock: ``list.append`` is atomic, the consumer takes the first
    ``n`` items with one slice and removes exactly those with one ``del`` (an item
    appended in between stays), and it clears ``_wakeup_scheduled`` *before*
    draining, so an item appended by a producer that saw the flag still set is
    always drained by the pass that follows. (A list, not a deque: an empty deque
    is 760 bytes, and every open stream has a channel.)
    """

    def __init__(self) -> None:
        hub = gevent.get_hub()
        self._hub_loop = hub.loop
        self._hub_thread = hub.thread_ident
        self._waiter: Waiter[Any] = Waiter(hub)
        self._items: list[Any] = []
        self._wakeup_scheduled = False

    def put(self, item: Any) -> None:
        self._items.append(item)
        if not self._wakeup_scheduled:
            self._wakeup_scheduled = True
            if native_thread_id() == self._hub_thread:  # the loop runs on this hub
                self._hub_loop.run_callback(self._waiter.switch, None)
            else:
                self._hub_loop.run_callback_threadsafe(self._waiter.switch, None)

    def get_batch(self, timeout: float | None) -> list[Any] | object:
        while True:
            # A wake-up that arrived while this greenlet was busy elsewhere is
            # stored by the Waiter: drop it, the drain below covers its items.
            self._waiter.clear()
            self._wakeup_scheduled = False
            items = self._items
            if items:
                taken = len(items)
                batch = items[:taken]
                del items[:taken]
                return batch
            if timeout is not None and timeout <= 0:
                return TIMEOUT
            if self._wait(timeout) is TIMEOUT:
                return TIMEOUT

    def _wait(self, timeout: float | None) -> object:
        if timeout is None:
            return self._waiter.get()
        # Made and closed here, in the consumer's greenlet (never on a foreign thread).
        timer = self._hub_loop.timer(timeout)
        try:
            timer.start(self._waiter.switch, TIMEOUT)
            return self._waiter.get()
        finally:
            timer.close()


Channel = ThreadChannel | GeventChannel


def new_channel() -> Channel:
    return GeventChannel() if gevent_patched() else ThreadChannel()


class OpenStreams:
    """The pump tasks of one loop's open streams; used on that loop's thread only."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False  # the worker is stopping: streams started now are cancelled too

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.closing:
            # call_soon: let the task take its first step, so its own handlers run.
            asyncio.get_running_loop().call_soon(task.cancel)

    async def cancel_all(self, timeout: float) -> tuple[int, int]:
        """Cancel every open stream and wait (bounded); returns (cancelled, unfinished)."""
        self.closing = True
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return 0, 0
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return len(tasks), len(pending)


async def _cancel_every_task(cancelled: list[asyncio.Task[Any]], timeout: float) -> None:
    """Cancel every other task of the running loop (listed in ``cancelled``), wait for them."""
    cancelled.extend(t for t in asyncio.all_tasks() if t is not asyncio.current_task())
    for task in cancelled:
        task.cancel()
    if cancelled:
        await asyncio.wait(cancelled, timeout=timeout)


class LoopThread:
    """The process's long-lived asyncio loop, started on first use and again after ``fork``.

    A greenlet on the gevent hub's thread under gevent (unless
    :meth:`prefer_native_thread` was called), a native thread otherwise; callers
    see the same interface.
    """

    def __init__(self, executor_workers: int = 16) -> None:
        self.executor_workers = executor_workers
        self._lock = native_lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._open_streams = OpenStreams()
        self._start_hooks: list[Callable[[asyncio.AbstractEventLoop], None]] = []
        self._hub_loop: HubLoop | None = None
        self._native_thread_preferred = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        pid = os.getpid()
        if self._loop is None or self._pid != pid:  # first use, or a forked child
            with self._lock:
                if self._loop is None or self._pid != pid:
                    self._loop = self._start()
                    self._pid = pid
        return self._loop

    def prefer_native_thread(self) -> None:
        """Run the loop on a native thread under gevent too (``CHATKIT_LOOP = "thread"``).

        Takes effect where the loop starts next: in a worker when the app is loaded
        in it (the usual case), not in a process whose loop runs already.
        """
        self._native_thread_preferred = True

    def current_loop(self) -> asyncio.AbstractEventLoop | None:
        """This process's loop if it runs already (never starts one)."""
        loop = self._loop
        return loop if loop is not None and self._pid == os.getpid() else None

    @property
    def open_streams(self) -> OpenStreams:
        """The streams running on this process's loop (use on the loop only)."""
        return self._open_streams

    def add_start_hook(self, hook: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        """Call ``hook(loop)`` whenever a process starts its loop."""
        self._start_hooks.append(hook)

    def _start(self) -> asyncio.AbstractEventLoop:
        self._open_streams = OpenStreams()  # a forked child starts with none
        self._hub_loop = None
        if gevent_patched() and not self._native_thread_preferred:
            self._hub_loop = HubLoop(self.executor_workers)
            loop: asyncio.AbstractEventLoop = self._hub_loop.loop
        else:
            loop = self._start_on_native_thread()
        for hook in self._start_hooks:
            hook(loop)
        return loop

    def _start_on_native_thread(self) -> asyncio.AbstractEventLoop:
        # gevent replaces the default selector with one that would block this
        # native thread on the hub: ask for the unpatched one.
        selector_cls: Any = selectors.DefaultSelector
        if gevent_patched():
            from gevent import monkey

            selector_cls = monkey.get_original("selectors", "DefaultSelector")
        loop = asyncio.SelectorEventLoop(selector_cls())
        # asyncio.to_thread / getaddrinfo need threads that really run in parallel.
        loop.set_default_executor(NativeThreadPool(self.executor_workers, "chatkit-loop-executor"))
        if gevent_patched():
            # Started from a request greenlet: this thread's hub serves the worker,
            # so sync_to_async work from this loop runs in greenlets on it.
            import gevent

            attach_hub(loop, gevent.get_hub())

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()

        start_native_thread(run)
        return loop

    def shutdown(self, timeout: float = 10.0) -> int:
        """Cancel every running task and wait (bounded) for them; returns how many."""
        loop = self._loop
        if loop is None or self._pid != os.getpid() or loop.is_closed():
            return 0
        cancelled: list[asyncio.Task[Any]] = []
        if self._hub_loop is not None:  # this very thread runs the loop: wait as a greenlet
            with contextlib.suppress(TimeoutError):
                self.run(
                    lambda: _cancel_every_task(cancelled, timeout),
                    contextvars.copy_context(),
                    timeout=timeout + 1,
                )
            return len(cancelled)
        finished = native_lock()
        finished.acquire()

        def start() -> None:
            task = asyncio.ensure_future(_cancel_every_task(cancelled, timeout))
            task.add_done_callback(lambda _: finished.release())

        loop.call_soon_threadsafe(start)
        finished.acquire(timeout=timeout + 1)
        return len(cancelled)

    def call_soon(self, fn: Callable[..., Any], *args: Any, context: contextvars.Context) -> None:
        """Run ``fn(*args)`` on the loop soon; safe from any thread or greenlet."""
        loop = self.loop
        hub_loop = self._hub_loop
        if hub_loop is not None:
            hub_loop.call_soon(fn, *args, context=context)
        else:
            loop.call_soon_threadsafe(fn, *args, context=context)

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
                channel.put(Outcome(await make_coro()))
            except BaseException as exc:  # re-raised in the caller
                channel.put(Outcome(error=exc))

        self.call_soon(lambda: asyncio.ensure_future(runner()), context=context)
        batch = channel.get_batch(timeout)
        if not isinstance(batch, list):
            raise TimeoutError("the ChatKit event loop did not answer in time")
        outcome: Outcome = batch[0]
        return outcome.unwrap()  # type: ignore[no-any-return]
