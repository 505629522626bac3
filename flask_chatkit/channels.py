"""Hand values from the asyncio loop thread to a waiting greenlet or thread.

A channel has one producer (the loop thread) and one consumer (the request).
``get_batch`` returns everything queued so far, so a burst of stream chunks
costs one wake-up and one socket write instead of one per chunk; under gevent
the producer also schedules at most one wake-up until the consumer drains.

Imports nothing of Flask.
"""

from __future__ import annotations

import collections
import queue
from typing import Any

from .threads import gevent_patched, native_lock

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
    """For greenlets: the producer wakes the consumer's hub thread-safely.

    ``run_callback_threadsafe`` is the one gevent call that is safe from a
    foreign OS thread; it sets an Event that the consumer greenlet waits on.
    """

    def __init__(self) -> None:
        import gevent
        import gevent.event

        self._hub_loop = gevent.get_hub().loop
        self._ready = gevent.event.Event()
        self._items: collections.deque[Any] = collections.deque()
        self._lock = native_lock()  # held for a few instructions by either side
        self._wakeup_scheduled = False

    def put(self, item: Any) -> None:
        with self._lock:
            self._items.append(item)
            if self._wakeup_scheduled:
                return
            self._wakeup_scheduled = True
        self._hub_loop.run_callback_threadsafe(self._ready.set)

    def get_batch(self, timeout: float | None) -> list[Any] | object:
        while True:
            with self._lock:
                if self._items:
                    batch = list(self._items)
                    self._items.clear()
                    self._wakeup_scheduled = False
                    return batch
            # A stale set() from an earlier wake-up only costs one extra loop.
            if not self._ready.wait(timeout):
                return TIMEOUT
            self._ready.clear()


Channel = ThreadChannel | GeventChannel


def new_channel() -> Channel:
    return GeventChannel() if gevent_patched() else ThreadChannel()
