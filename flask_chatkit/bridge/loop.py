"""The per-process asyncio loop that runs ChatKit for synchronous WSGI code.

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
import selectors
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .channels import new_channel
from .hub import attach_hub
from .lifecycle import OpenStreams
from .native import NativeThreadPool, gevent_patched, native_lock, start_native_thread

T = TypeVar("T")
logger = logging.getLogger("flask_chatkit")


@dataclass(frozen=True)
class Failure:
    """An exception raised on the loop, handed to the waiting request."""

    exc: BaseException


@dataclass(frozen=True)
class _Success:
    value: Any


class LoopThread:
    """A long-lived asyncio loop on a native thread, re-created after ``fork``."""

    def __init__(self, executor_workers: int = 16) -> None:
        self.executor_workers = executor_workers
        self._lock = native_lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._open_streams = OpenStreams()
        self._start_hooks: list[Callable[[asyncio.AbstractEventLoop], None]] = []

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        pid = os.getpid()
        if self._loop is None or self._pid != pid:  # first use, or a forked child
            with self._lock:
                if self._loop is None or self._pid != pid:
                    self._loop = self._start()
                    self._pid = pid
        return self._loop

    def current_loop(self) -> asyncio.AbstractEventLoop | None:
        """This process's loop if it runs already (never starts one)."""
        loop = self._loop
        return loop if loop is not None and self._pid == os.getpid() else None

    @property
    def open_streams(self) -> OpenStreams:
        """The streams running on this process's loop (use on the loop thread)."""
        return self._open_streams

    def add_start_hook(self, hook: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        """Call ``hook(loop)`` whenever a process starts its loop."""
        self._start_hooks.append(hook)

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
        if gevent_patched():
            # Started from a request greenlet: this thread's hub serves the worker,
            # so sync_to_async work from this loop runs in greenlets on it.
            import gevent

            attach_hub(loop, gevent.get_hub())

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_forever()

        self._open_streams = OpenStreams()  # a forked child starts with none
        start_native_thread(run)
        for hook in self._start_hooks:
            hook(loop)
        return loop

    def shutdown(self, timeout: float = 10.0) -> int:
        """Cancel every running task and wait (bounded) for them; returns how many."""
        loop = self._loop
        if loop is None or self._pid != os.getpid() or loop.is_closed():
            return 0
        finished = native_lock()
        finished.acquire()
        cancelled: list[asyncio.Task[Any]] = []

        async def cancel_all() -> None:
            cancelled.extend(t for t in asyncio.all_tasks() if t is not asyncio.current_task())
            for task in cancelled:
                task.cancel()
            if cancelled:
                await asyncio.wait(cancelled, timeout=timeout)

        def start() -> None:
            asyncio.ensure_future(cancel_all()).add_done_callback(lambda _: finished.release())

        loop.call_soon_threadsafe(start)
        finished.acquire(timeout=timeout + 1)
        return len(cancelled)

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
        batch = channel.get_batch(timeout)
        if not isinstance(batch, list):
            raise TimeoutError("the ChatKit event loop did not answer in time")
        outcome = batch[0]
        if isinstance(outcome, Failure):
            raise outcome.exc
        return outcome.value  # type: ignore[no-any-return]
