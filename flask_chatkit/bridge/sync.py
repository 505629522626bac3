"""Sync code back into ``respond``: ``sync_to_async`` and ``sync_to_async_iter``.

``respond`` runs on the worker's one asyncio loop, so a blocking call there
stalls every stream of the worker. These helpers run sync code off the loop,
built on asgiref's ``SyncToAsync`` (``thread_sensitive=False``, our executor):

* under a gevent worker, in a new greenlet on the worker's hub (main thread):
  cooperative I/O, thousands at once, and a greenlet can be killed;
* elsewhere (gthread, sync, ``flask run``, the test client), on a native thread
  of a per-process pool.

The caller's ``contextvars`` are copied in (asgiref does ``copy_context().run``),
so Flask's ``current_app``/``g``/``request``, Flask-Login's ``current_user`` and
Flask-SQLAlchemy's ``db.session`` work as in a view.

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Iterator
from typing import Any, Generic, ParamSpec, TypeVar, cast

import greenlet
from asgiref.sync import SyncToAsync

from .hub import HubExecutor, hub_executor_for
from .native import NativeThreadPool, native_lock

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
logger = logging.getLogger("flask_chatkit")

__all__ = ["sync_to_async", "sync_to_async_iter"]

# Native threads for sync work outside gevent: spawned on demand, so the bound
# costs nothing until used (a gthread worker with --threads N needs up to N).
MAX_SYNC_THREADS = 64

_pool_lock = native_lock()
_pool: tuple[int, NativeThreadPool] | None = None


def _native_pool() -> NativeThreadPool:
    global _pool
    pid = os.getpid()
    if _pool is None or _pool[0] != pid:  # first use, or a forked child
        with _pool_lock:
            if _pool is None or _pool[0] != pid:
                _pool = (pid, NativeThreadPool(MAX_SYNC_THREADS, "chatkit-sync"))
    return _pool[1]


def executor_for(loop: asyncio.AbstractEventLoop) -> concurrent.futures.Executor:
    """Where sync work from ``loop`` runs: its gevent hub if it has one, else native threads."""
    return hub_executor_for(loop) or _native_pool()


def _off_loop(func: Callable[..., R], executor: concurrent.futures.Executor) -> SyncToAsync[..., R]:
    # asgiref types ``executor`` as a ThreadPoolExecutor, but it only calls
    # ``loop.run_in_executor(executor, …)``, i.e. ``submit``.
    return SyncToAsync(
        func, thread_sensitive=False, executor=cast(concurrent.futures.ThreadPoolExecutor, executor)
    )


class _RunningLoopExecutor(concurrent.futures.Executor):
    """Submits to wherever sync work of the calling loop goes (decided per call)."""

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        return executor_for(asyncio.get_running_loop()).submit(fn, *args, **kwargs)


_RUNNING_LOOP_EXECUTOR = _RunningLoopExecutor()


def sync_to_async(func: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """An async callable that runs ``func`` off the event loop, with the caller's contextvars.

    ``await sync_to_async(func)(*args, **kwargs)`` returns ``func``'s result or
    raises its exception. When the awaiting task is cancelled, the
    cancellation is not held up: ``func`` finishes on its own and its result
    is dropped. Also usable as a decorator (on methods too).
    """
    return _off_loop(func, _RUNNING_LOOP_EXECUTOR)


_DONE: Any = object()  # the sync iterator is exhausted


class _Lane(Generic[T]):
    """One sync iterator driven from the loop: ``next()`` off the loop, closed exactly once.

    ``step`` runs in a worker (greenlet or thread), ``stop`` on the loop. The
    native lock decides who closes the iterator: the loop (nothing running) or
    the worker whose ``next()`` was in flight when the consumer went away.
    """

    def __init__(self, iterable: Iterable[T], executor: concurrent.futures.Executor) -> None:
        self._iterable = iterable
        self._iterator: Iterator[T] | None = None
        self.executor = executor
        self._hub = executor if isinstance(executor, HubExecutor) else None
        self._lock = native_lock()
        self._running = False
        self._stopping = False  # the consumer has gone: no more next()
        self._close_claimed = False
        self._close_started = False
        self._greenlet: Any = None  # the greenlet inside next(), under gevent

    def step(self) -> T:
        """The next item, or ``_DONE``; runs in a worker."""
        with self._lock:
            go = not self._stopping
            self._running = go
            claim = not go and self._claim_close()
        if not go:  # the consumer left before this step started
            if claim:
                self.close()
            return cast(T, _DONE)
        if self._hub is not None:
            self._greenlet = greenlet.getcurrent()
        try:
            if self._iterator is None:
                self._iterator = iter(self._iterable)
            return next(self._iterator, _DONE)
        finally:
            self._greenlet = None
            with self._lock:
                self._running = False
                claim = self._stopping and self._claim_close()
            if claim:  # the consumer left while next() ran: close it here, off the loop
                self.close()

    def stop(self) -> bool:
        """The consumer is done (loop side, never blocks). True: the caller must close it."""
        with self._lock:
            self._stopping = True
            if not self._running:
                return self._claim_close()
        if self._hub is not None:  # don't wait for a blocked next(): kill its greenlet
            self._hub.call_in_hub(self._interrupt)
        return False  # a thread closes it when its next() returns

    def _interrupt(self) -> None:
        # In the hub's thread, as is the worker greenlet: this check and the
        # throw cannot interleave with it, so a close already begun is never hit.
        worker = self._greenlet
        if worker is not None and not worker.dead:
            worker.throw(greenlet.GreenletExit)

    def _claim_close(self) -> bool:  # under self._lock
        if self._close_claimed:
            return False
        self._close_claimed = True
        return True

    def close(self) -> None:
        """Close the iterator: GeneratorExit at a generator's ``yield``, its ``finally`` runs.

        Runs once: a close scheduled again (its awaiting task was cancelled
        meanwhile) must not re-enter a generator that is still closing.
        """
        with self._lock:
            if self._close_started:
                return
            self._close_started = True
        closer = getattr(self._iterator, "close", None)
        if closer is None:
            return
        try:
            closer()
        except Exception:  # a cleanup failure must not mask why the consumer stopped
            logger.exception("closing a sync iterator failed")

    def close_in_background(self) -> None:
        """Close off the loop without waiting (the consumer is being cancelled)."""
        self.executor.submit(contextvars.copy_context().run, self.close)


async def _iterate(iterable: Iterable[T]) -> AsyncGenerator[T, None]:
    lane = _Lane(iterable, executor_for(asyncio.get_running_loop()))
    step = _off_loop(lane.step, lane.executor)
    cancelled = False
    try:
        while True:
            item = await step()
            if item is _DONE:
                return
            yield item
    except asyncio.CancelledError:
        cancelled = True
        raise
    finally:
        if lane.stop():
            if cancelled:  # let the cancellation reach ChatKit now
                lane.close_in_background()
            else:  # aclose(), exhaustion or an error: close it before going on
                try:
                    await _off_loop(lane.close, lane.executor)()
                except asyncio.CancelledError:
                    lane.close_in_background()
                    raise


def sync_to_async_iter(iterable: Iterable[T]) -> AsyncGenerator[T, None]:
    """An async iterator over a sync iterable, each ``next()`` off the event loop.

    When the consumer stops early (``aclose()``, an exception, or the task is
    cancelled) the sync iterator is closed: a generator gets ``GeneratorExit``
    at its ``yield`` and its ``finally`` blocks run. Cancellation is never held
    up by a ``next()`` still running: under gevent its greenlet is killed
    (``GreenletExit`` where it blocks); on a thread, the generator is closed
    when that ``next()`` returns.
    """
    return _iterate(iterable)
