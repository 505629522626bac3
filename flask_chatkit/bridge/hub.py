"""Run sync work in greenlets on the worker's gevent hub, handed over from the loop.

Under a gevent worker the hub lives in the main thread; the asyncio loop is a
greenlet on it, or with ``CHATKIT_LOOP = "thread"`` a native thread (see
:mod:`.loop`). Blocking-but-cooperative code (patched sockets, ``time.sleep``,
psycopg >= 3.1.14) belongs on the hub: one greenlet per call, thousands at once.
:class:`HubExecutor` spawns that greenlet through the hub's
``run_callback_threadsafe`` (the one gevent call that is also safe from a foreign
thread) and settles the result on the asyncio loop with ``call_soon_threadsafe``,
so the ``concurrent.futures.Future`` is only ever touched by the loop's own code
(gevent's patched locks inside it must not be contended across threads).

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

from .native import outcome_of, settle, settle_from_thread

T = TypeVar("T")
logger = logging.getLogger("flask_chatkit")

__all__ = ["HubExecutor", "attach_hub", "hub_executor_for"]


class HubExecutor(concurrent.futures.Executor):
    """An executor whose jobs run as greenlets on one gevent hub, submitted from any thread."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self._shutdown = False

    def call_in_hub(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` as a callback in the hub's thread (safe from any thread)."""
        self.hub.loop.run_callback_threadsafe(fn, *args)

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


def attach_hub(loop: asyncio.AbstractEventLoop, hub: Any) -> None:
    """Send ``sync_to_async`` work from ``loop`` to greenlets on ``hub``."""
    _executors[loop] = HubExecutor(hub)


def hub_executor_for(loop: asyncio.AbstractEventLoop) -> HubExecutor | None:
    return _executors.get(loop)
