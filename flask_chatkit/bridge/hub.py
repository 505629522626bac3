"""Run sync work in greenlets on the worker's gevent hub, handed over from the loop.

Under a gevent worker the hub lives in the main thread; the asyncio loop is a
greenlet on it, or with ``CHATKIT_LOOP = "thread"`` a native thread (see
:mod:`.loop`). Blocking-but-cooperative code (patched sockets, ``time.sleep``,
psycopg >= 3.1.14) belongs on the hub: one greenlet per call, thousands at once.
``sync_to_async`` sends its calls here, and on PostgreSQL so does the store.

:class:`HubExecutor` spawns that greenlet with the hub's ``run_callback`` (its
thread-safe variant from a foreign thread, the one gevent call that is safe there)
and settles the result on the asyncio loop: with ``call_soon_threadsafe`` when the
loop runs on another thread, so the ``concurrent.futures.Future`` is only ever
touched by the loop's own code (gevent's patched locks inside it must not be
contended across threads); with the loop's own same-thread hand-over when the loop
is a greenlet on this hub (no self-pipe).

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import gevent

from .native import native_thread_id, outcome_of, settle, settle_from_thread

T = TypeVar("T")
logger = logging.getLogger("flask_chatkit")

__all__ = ["HubExecutor", "attach_hub", "hub_executor_for"]


class HubExecutor(concurrent.futures.Executor):
    """An executor whose jobs run as greenlets on one gevent hub, submitted from any thread.

    ``call_soon_on_loop`` is given when the loop itself is a greenlet on this hub
    (:class:`~.hub_loop.HubLoop`): it queues a callback on the loop and ends the
    loop's wait without asyncio's self-pipe, from any greenlet of the hub's thread.
    """

    def __init__(self, hub: Any, call_soon_on_loop: Callable[..., None] | None = None) -> None:
        self.hub = hub
        self._call_soon_on_loop = call_soon_on_loop
        self._shutdown = False

    def call_in_hub(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` as a callback in the hub's thread (safe from any thread)."""
        if native_thread_id() == self.hub.thread_ident:
            self.hub.loop.run_callback(fn, *args)
        else:
            self.hub.loop.run_callback_threadsafe(fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Await ``fn(*args)`` run in a new greenlet on the hub, from the loop on that hub.

        No thread is involved: the greenlet starts with a callback, and its outcome
        reaches the loop through ``call_soon_on_loop``. Only for a loop that runs on
        this hub (a :class:`~.hub_loop.HubEventLoop`), and only for work that waits cooperatively:
        native blocking calls here would stall every request of the worker.
        """
        call_soon_on_loop = self._call_soon_on_loop
        if call_soon_on_loop is None:
            raise RuntimeError("HubExecutor.run needs the loop on the hub")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def job() -> None:
            outcome = outcome_of(fn, *args)
            if not future.done():  # cancelled meanwhile: nobody waits
                call_soon_on_loop(settle, future, *outcome)

        gevent.spawn_raw(job)
        return await future

    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        if self._shutdown:
            raise RuntimeError("cannot schedule new work after shutdown")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # submitted from plain sync code: settle in the greenlet
            loop = None
        cancelled = False

        def note_cancel(done: concurrent.futures.Future[T]) -> None:
            nonlocal cancelled
            cancelled = done.cancelled()  # read by the greenlet; a bool needs no lock

        future.add_done_callback(note_cancel)

        def job() -> None:
            if cancelled:  # cancelled before it started: skip the work
                return
            outcome = outcome_of(fn, *args, **kwargs)
            if loop is None:
                settle(future, *outcome)
            elif self._call_soon_on_loop is not None:  # the loop runs on this very thread
                self._call_soon_on_loop(settle, future, *outcome)
            else:
                settle_from_thread(loop, future, outcome)

        self.call_in_hub(gevent.spawn, job)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True


# The hub that serves each loop: registered by whoever starts the loop from the
# hub's thread (LoopThread under gevent). A loop without one uses native threads.
_executors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, HubExecutor] = (
    weakref.WeakKeyDictionary()
)


def attach_hub(
    loop: asyncio.AbstractEventLoop,
    hub: Any,
    call_soon_on_loop: Callable[..., None] | None = None,
) -> HubExecutor:
    """Send ``sync_to_async`` work from ``loop`` to greenlets on ``hub``.

    ``call_soon_on_loop``: given when ``loop`` itself runs on ``hub`` (see
    :class:`HubExecutor`).
    """
    executor = _executors[loop] = HubExecutor(hub, call_soon_on_loop)
    return executor


def hub_executor_for(loop: asyncio.AbstractEventLoop) -> HubExecutor | None:
    return _executors.get(loop)
