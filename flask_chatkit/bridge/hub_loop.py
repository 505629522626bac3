"""The worker's asyncio loop as a greenlet on the gevent hub's own thread.

Under ``gunicorn -k gevent`` every request is a greenlet on one OS thread. With
the loop on a native thread of its own, each stream start, plain request and
batch of events crossed between the two threads (a GIL hand-off and a wake-up
each way), and under a burst of stream starts the hub and the loop fought for
the GIL. Here the loop is one more greenlet: handing it work is a callback and a
greenlet switch. Store calls and ``asyncio.to_thread`` still leave the loop for
native threads, and ``sync_to_async`` for greenlets on this hub, as before.
Figures: ``docs/design/request-flow.md``; ``CHATKIT_LOOP = "thread"`` turns it off.

Deliberate departures from a plain asyncio loop, cited where they are made:

1. asyncio keeps its running loop, and its async-generator hooks, per OS thread.
   Left set while the loop waits, every request greenlet would see a running loop:
   ``run_inline``'s store reads would go async, and ``asyncio.run`` or asgiref's
   ``async_to_sync`` in a Flask view would refuse to run. :class:`HubSelector`
   gives them back whenever the loop greenlet waits for I/O: the running loop and
   hooks that the hub's other greenlets had when the loop resumed, not simply none.
   A view's own ``asyncio.run`` waits cooperatively too, and the loop may run in
   that wait: cleared instead, the view's loop would resume with no running loop
   (``asyncio.sleep`` then raises), and async generators our streams start meanwhile
   would register with the view's loop, which closes them when it ends. (Code on
   the loop that waits cooperatively by itself, e.g. a patched socket call made
   directly inside an async ``respond``, already stalls every stream; while it
   waits the other greenlets see the loop as running.)
2. Work handed over from the hub's own thread skips asyncio's self-pipe (a write
   and a read per hand-over): :meth:`HubLoop.call_soon` queues the callback and
   ends the selector's wait with a greenlet switch. Other threads (store
   workers, executors) still use ``call_soon_threadsafe``.

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import sys
from collections.abc import Callable
from typing import Any

import gevent
from gevent.hub import Waiter

from .hub import HubExecutor, attach_hub
from .native import NativeThreadPool, native_thread_id

__all__ = ["HubEventLoop", "HubLoop", "HubSelector"]


_EV_READ, _EV_WRITE = 1, 2  # libev's flags, as gevent's io watchers take them


class HubSelector(selectors._BaseSelectorImpl):
    """A selector for an asyncio loop that runs in a greenlet of the gevent hub.

    Each registered file has a gevent io watcher; waiting is one ``Waiter`` that the
    watchers, a timer or :meth:`wake` switch back to. gevent's own selector does the
    same with an ``Event`` and a ``Timeout`` per wait and (re)starts its watchers on
    every call, which cost several per cent of a stream's CPU here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._hub = gevent.get_hub()
        self._watchers: dict[int, Any] = {}
        self._ready: dict[int, int] = {}  # fd -> selectors.EVENT_* seen since the last select
        self._fired: list[int] = []  # fds whose watcher stopped when it fired
        self._waiter: Waiter[Any] | None = None  # set while the loop greenlet waits
        self._woken = False
        # Departure 1: what the hub's other greenlets had when the loop last resumed,
        # and the loop's own async-generator hooks (set by attach).
        self._outside_loop: asyncio.AbstractEventLoop | None = None
        self._outside_hooks: tuple[Any, Any] | None = None  # None: the loop's own
        self._own_hooks: tuple[Any, Any] = (None, None)

    def attach(self, loop: asyncio.BaseEventLoop) -> None:
        """Serve ``loop``: its running-loop mark and the async-generator hooks its
        ``run_forever`` sets are what this selector swaps in and out (departure 1)."""
        self.loop = loop
        self._own_hooks = (
            loop._asyncgen_firstiter_hook,  # type: ignore[attr-defined]
            loop._asyncgen_finalizer_hook,  # type: ignore[attr-defined]
        )

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        key = super().register(fileobj, events, data)
        flags = (_EV_READ if events & selectors.EVENT_READ else 0) | (
            _EV_WRITE if events & selectors.EVENT_WRITE else 0
        )
        try:
            watcher = self._hub.loop.io(key.fd, flags)
        except OSError as exc:
            super().unregister(fileobj)
            raise ValueError(f"invalid file descriptor {key.fd}") from exc
        watcher.start(self._on_io, key.fd, pass_events=True)
        self._watchers[key.fd] = watcher
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = super().unregister(fileobj)
        watcher = self._watchers.pop(key.fd)
        watcher.stop()
        watcher.close()
        self._ready.pop(key.fd, None)
        return key

    def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.stop()
            watcher.close()
        self._watchers.clear()
        super().close()

    def _on_io(self, events: int, fd: int) -> None:  # in the hub
        mask = (selectors.EVENT_READ if events & _EV_READ else 0) | (
            selectors.EVENT_WRITE if events & _EV_WRITE else 0
        )
        self._ready[fd] = self._ready.get(fd, 0) | mask
        # Stopped until the loop has seen it (restarted by the next select): a file
        # that stays ready must not spin the hub while the loop greenlet is busy.
        self._watchers[fd].stop()
        self._fired.append(fd)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.switch(None)

    def wake(self) -> None:
        """End the loop's current wait (from a greenlet of the hub's thread only)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._hub.loop.run_callback(waiter.switch, None)
        else:
            self._woken = True  # the loop runs: its next select must not wait

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        asyncio._set_running_loop(self._outside_loop)  # departure 1
        if self._outside_hooks is not None:
            sys.set_asyncgen_hooks(*self._outside_hooks)
        try:
            for fd in self._fired:
                watcher = self._watchers.get(fd)  # None: unregistered meanwhile
                if watcher is not None and not watcher.active:
                    watcher.start(self._on_io, fd, pass_events=True)
            self._fired.clear()
            if self._ready or self._woken or (timeout is not None and timeout <= 0):
                # Work is ready: still let the hub run everything else once, so a
                # loop that always has callbacks ready never starves a request.
                gevent.sleep(0)
            else:
                self._wait(timeout)
            self._woken = False
            ready = []
            keys = self.get_map()
            for fd, mask in self._ready.items():
                key = keys.get(fd)
                if key is not None and mask & key.events:
                    ready.append((key, mask & key.events))
            self._ready.clear()
            return ready
        finally:
            outside = asyncio._get_running_loop()
            self._outside_loop = None if outside is self.loop else outside
            current = sys.get_asyncgen_hooks()
            hooks = (current.firstiter, current.finalizer)
            if hooks == self._own_hooks:
                self._outside_hooks = None
            else:
                self._outside_hooks = hooks
                sys.set_asyncgen_hooks(*self._own_hooks)
            asyncio._set_running_loop(self.loop)

    def _wait(self, timeout: float | None) -> None:
        waiter: Waiter[Any] = Waiter(self._hub)
        self._waiter = waiter
        timer = None
        if timeout is not None:
            timer = self._hub.loop.timer(timeout)
            timer.start(waiter.switch, None)
        try:
            waiter.get()
        finally:
            self._waiter = None
            if timer is not None:
                timer.close()


class HubEventLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop on a :class:`HubSelector`.

    ``hub`` runs sync work in greenlets on the same hub (``sync_to_async``, the
    store's PostgreSQL calls); code that must know whether the running loop is on
    the hub asks ``isinstance(loop, HubEventLoop)``.
    """

    hub: HubExecutor


class HubLoop:
    """An asyncio loop running forever in a greenlet of the calling thread's hub."""

    def __init__(self, executor_workers: int) -> None:
        self.selector = HubSelector()
        self.loop = HubEventLoop(self.selector)
        self.selector.attach(self.loop)
        # asyncio.to_thread / getaddrinfo need threads that really run in parallel.
        self.loop.set_default_executor(NativeThreadPool(executor_workers, "chatkit-loop-executor"))
        hub = gevent.get_hub()
        self.thread_id = native_thread_id()
        # sync_to_async work, and PostgreSQL store calls, run in greenlets on this hub.
        self.loop.hub = attach_hub(self.loop, hub, self._call_soon_from_hub)
        self.greenlet = gevent.spawn(self.loop.run_forever)

    def call_soon(self, fn: Callable[..., Any], *args: Any, context: contextvars.Context) -> None:
        if native_thread_id() == self.thread_id:  # departure 2
            self.loop.call_soon(fn, *args, context=context)
            self.selector.wake()
        else:
            self.loop.call_soon_threadsafe(fn, *args, context=context)

    def _call_soon_from_hub(self, fn: Callable[..., Any], *args: Any) -> None:
        """``call_soon`` for a greenlet of the hub's thread, with no context to carry."""
        self.loop.call_soon(fn, *args, context=_NO_CONTEXT)  # departure 2
        self.selector.wake()


# Outcomes settled on the loop (a future's result) read no context variable.
_NO_CONTEXT = contextvars.Context()
