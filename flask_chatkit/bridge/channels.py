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

import gevent
import gevent.event

from .native import gevent_patched

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
    No lock: ``deque.append``/``popleft`` are atomic, and the consumer clears
    ``_wakeup_scheduled`` *before* draining, so an item appended by a producer
    that saw the flag still set is always drained by the pass that follows.
    """

    def __init__(self) -> None:
        self._hub_loop = gevent.get_hub().loop
        self._ready = gevent.event.Event()
        self._items: collections.deque[Any] = collections.deque()
        self._wakeup_scheduled = False

    def put(self, item: Any) -> None:
        self._items.append(item)
        if not self._wakeup_scheduled:
            self._wakeup_scheduled = True
            self._hub_loop.run_callback_threadsafe(self._ready.set)

    def get_batch(self, timeout: float | None) -> list[Any] | object:
        while True:
            self._ready.clear()
            self._wakeup_scheduled = False
            batch = []
            while self._items:
                batch.append(self._items.popleft())
            if batch:
                return batch
            # A stale set() from an earlier wake-up only costs one extra pass.
            if not self._ready.wait(timeout):
                return TIMEOUT


Channel = ThreadChannel | GeventChannel


def new_channel() -> Channel:
    return GeventChannel() if gevent_patched() else ThreadChannel()
