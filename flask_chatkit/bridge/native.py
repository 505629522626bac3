"""Native OS threads, even inside a gevent-patched process.

Under ``gevent.monkey.patch_all()`` ``threading.Thread`` is a greenlet and
``queue.SimpleQueue`` blocks the hub, so anything that must really run in
parallel with the gevent hub (the asyncio loop, blocking database calls made
from that loop) is started here with the *original* ``start_new_thread`` and
fed through the C ``_queue.SimpleQueue``, which gevent never patches.

Imports nothing of Flask: the SQLAlchemy store uses it too.
"""

from __future__ import annotations

import _queue
import asyncio
import concurrent.futures
import contextlib
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "NativeThreadPool",
    "Outcome",
    "gevent_patched",
    "native_lock",
    "native_thread_id",
    "native_thread_local",
    "outcome_of",
    "settle",
    "settle_from_thread",
    "start_native_thread",
]

# (True, result) or (False, exception) of a call made on another thread.
Outcome = tuple[bool, Any]


def gevent_patched() -> bool:
    """True when gevent has monkey-patched ``threading`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("threading"))


def _original(module: str, name: str) -> Any:
    if gevent_patched():
        from gevent import monkey

        return monkey.get_original(module, name)
    return getattr(__import__(module), name)


def start_native_thread(target: Callable[[], None]) -> None:
    """Start ``target`` on a real OS thread (never a greenlet)."""
    _original("_thread", "start_new_thread")(target, ())


_get_ident: tuple[bool, Callable[[], int]] | None = None  # (patched when found, get_ident)


def native_thread_id() -> int:
    """The OS thread's id (gevent's patched ``get_ident`` names the greenlet instead).

    On the hot path of every hand-over to the loop: the original function is looked
    up once (again if gevent patches the process afterwards).
    """
    global _get_ident
    patched = gevent_patched()
    if _get_ident is None or _get_ident[0] != patched:
        _get_ident = (patched, _original("_thread", "get_ident"))
    return _get_ident[1]()


def native_thread_local() -> Any:
    """An object whose attributes are per OS thread (gevent's ``local`` is per greenlet)."""
    return _original("_thread", "_local")()


def native_lock() -> Any:
    """A real OS lock (gevent's patched locks must not be shared across threads)."""
    return _original("_thread", "allocate_lock")()


def outcome_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Outcome:
    """Call ``fn``; its result or whatever it raised (GreenletExit too), for a waiter."""
    try:
        return True, fn(*args, **kwargs)
    except BaseException as exc:  # handed to the waiter, who re-raises it
        return False, exc


def settle(
    future: asyncio.Future[Any] | concurrent.futures.Future[Any], ok: bool, value: Any
) -> None:
    """Give ``future`` an outcome, unless it is done already (cancelled: nobody waits)."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


def settle_from_thread(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any] | concurrent.futures.Future[Any],
    outcome: Outcome,
) -> None:
    """Settle ``future`` on ``loop``'s own thread, from any other thread.

    Only the loop thread ever touches the future, so no lock crosses threads.
    """
    # RuntimeError: the loop closed while the work ran; nobody is waiting.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle, future, *outcome)


_STOP = object()


class NativeThreadPool(concurrent.futures.ThreadPoolExecutor):
    """A small thread pool whose workers are real OS threads.

    It is a ``ThreadPoolExecutor`` (asyncio insists on one for its default
    executor) whose ``submit`` never touches the stdlib's greenlet-patched
    threads, so it can be an asyncio loop's default executor
    (``asyncio.to_thread`` and ``getaddrinfo`` then work under gevent), and it
    offers :meth:`run` to await blocking work from a coroutine without
    ``concurrent.futures`` condition variables crossing threads.
    """

    def __init__(
        self,
        max_workers: int = 8,
        name: str = "chatkit-worker",
        on_start: Callable[[], None] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        super().__init__(max_workers, thread_name_prefix=name)  # bookkeeping only
        self.max_workers = max_workers
        self.name = name
        self._on_start = on_start  # run by each worker thread before its first job
        self._work: _queue.SimpleQueue[Any] = _queue.SimpleQueue()
        self._lock = native_lock()
        self._started = 0
        self._idle = 0  # workers waiting for a job
        self._pending = 0  # jobs queued that no worker has taken yet
        self._shutdown = False

    # -- the worker side ------------------------------------------------
    def _worker(self) -> None:
        if self._on_start is not None:
            self._on_start()
        while True:
            job = self._work.get()
            if job is _STOP:
                return
            with self._lock:
                self._idle -= 1
                self._pending -= 1
            try:
                job()
            finally:
                with self._lock:
                    self._idle += 1

    def _dispatch(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new work after shutdown")
            # Count queued jobs, not just idle workers: a burst submitted before
            # any worker wakes up must still get one worker per job.
            self._pending += 1
            spawn = self._pending > self._idle and self._started < self.max_workers
            if spawn:
                self._started += 1
                self._idle += 1
        if spawn:
            start_native_thread(self._worker)
        self._work.put(job)

    # -- asyncio-friendly entry point ---------------------------------
    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a pool thread; await its result without blocking the loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def job() -> None:
            settle_from_thread(loop, future, outcome_of(fn, *args))

        self._dispatch(job)
        return await future

    # -- concurrent.futures.Executor ------------------------------------
    def submit(
        self, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self._dispatch(job)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            workers = self._started
        for _ in range(workers):
            self._work.put(_STOP)
