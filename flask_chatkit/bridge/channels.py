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
from gevent.hub import Waiter

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
    foreign OS thread; the callback switches straight to the waiting greenlet
    through a ``Waiter`` (an ``Event`` would add its link notification and a
    second hub callback to every wake-up). No lock: ``deque.append``/``popleft``
    are atomic, and the consumer clears ``_wakeup_scheduled`` *before* draining,
    so an item appended by a producer that saw the flag still set is always
    drained by the pass that follows.
    """

    def __init__(self) -> None:
        hub = gevent.get_hub()
        self._hub_loop = hub.loop
        self._waiter: Waiter[Any] = Waiter(hub)
        self._items: collections.deque[Any] = collections.deque()
        self._wakeup_scheduled = False

    def put(self, item: Any) -> None:
        self._items.append(item)
        if not self._wakeup_scheduled:
            self._wakeup_scheduled = True
            self._hub_loop.run_callback_threadsafe(self._waiter.switch, None)

    def get_batch(self, timeout: float | None) -> list[Any] | object:
        while True:
            # A wake-up that arrived while this greenlet was busy elsewhere is
            # stored by the Waiter: drop it, the drain below covers its items.
            self._waiter.clear()
            self._wakeup_scheduled = False
            batch = []
            while self._items:
                batch.append(self._items.popleft())
            if batch:
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
