"""The worker's asyncio loop as a greenlet on the gevent hub's own thread.

Under ``gunicorn -k gevent`` every request is a greenlet on one OS thread. With
the loop on a native thread of its own, each stream start, plain request and
batch of events crossed between the two threads (a GIL hand-off and a wake-up
each way), and under a burst of stream starts the hub and the loop fought for
the GIL. Here the loop is one more greenlet: handing it work is a callback and a
greenlet switch. Store calls, ``asyncio.to_thread`` and ``sync_to_async`` still
leave the loop exactly as before (native threads, and greenlets on this hub).
Figures: ``bench/ANALYSIS.md``.

Deliberate departures from a plain asyncio loop, cited where they are made:

1. asyncio keeps its running loop per OS thread. Left set while the loop waits,
   every request greenlet would see a running loop: ``run_inline``'s store reads
   would go async, and ``asyncio.run`` or asgiref's ``async_to_sync`` in a Flask
   view would refuse to run. :class:`HubSelector` clears it whenever the loop
   greenlet waits for I/O and sets it back when it resumes. (Code on the loop
   that waits cooperatively by itself, e.g. a patched socket call made directly
   inside an async ``respond``, already stalls every stream; while it waits the
   other greenlets see the loop as running.)
2. Work handed over from the hub's own thread skips asyncio's self-pipe (a write
   and a read per hand-over): :meth:`HubLoop.call_soon` queues the callback and
   sets the selector's event. Other threads (store workers, executors) still use
   ``call_soon_threadsafe``.

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

import gevent
from gevent.selectors import GeventSelector

from .hub import attach_hub
from .native import NativeThreadPool, native_thread_id

__all__ = ["HubLoop", "HubSelector"]


class HubSelector(GeventSelector):  # type: ignore[misc]  # gevent ships no types
    """gevent's selector, waited on by an asyncio loop that runs in a greenlet."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: asyncio.AbstractEventLoop | None = None

    def select(self, timeout: float | None = None) -> Any:
        asyncio._set_running_loop(None)  # departure 1
        try:
            # With callbacks ready asyncio polls with a timeout of 0; gevent's
            # selector still yields to the hub then, so a loop that always has work
            # ready lets every request greenlet run too.
            return super().select(timeout)
        finally:
            asyncio._set_running_loop(self.loop)

    def wake(self) -> None:
        """End the loop's current wait (from a greenlet of the hub's thread only)."""
        self._ready.set()


class HubLoop:
    """An asyncio loop running forever in a greenlet of the calling thread's hub."""

    def __init__(self, executor_workers: int) -> None:
        self.selector = HubSelector()
        self.loop = asyncio.SelectorEventLoop(self.selector)
        self.selector.loop = self.loop
        # asyncio.to_thread / getaddrinfo need threads that really run in parallel.
        self.loop.set_default_executor(NativeThreadPool(executor_workers, "chatkit-loop-executor"))
        hub = gevent.get_hub()
        self.thread_id = native_thread_id()
        attach_hub(self.loop, hub)  # sync_to_async work runs in greenlets on this hub
        self.greenlet = gevent.spawn(self.loop.run_forever)

    def call_soon(self, fn: Callable[..., Any], *args: Any, context: contextvars.Context) -> None:
        if native_thread_id() == self.thread_id:  # departure 2
            self.loop.call_soon(fn, *args, context=context)
            self.selector.wake()
        else:
            self.loop.call_soon_threadsafe(fn, *args, context=context)
