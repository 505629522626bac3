"""Run blocking file and object-storage calls off the gevent hub.

Under ``gunicorn -k gevent`` every request is a greenlet on one OS thread (the
hub's). A disk write, an ``fsync`` or a boto3 call (which hashes and signs the
whole body before sending it) blocks that thread, and with it every stream of
the worker. :class:`OffloadPool` hands such a call to a few *native* threads of
its own and lets only the calling greenlet wait. Anywhere else (a native thread
such as the ChatKit loop's executor, gthread/sync workers, the CLI) the call
already runs on a thread of its own and is made directly. :func:`cooperate`
lets a greenlet that reads a fast request body give the others their turn.

Imports nothing of Flask.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from ..bridge.native import gevent_patched

T = TypeVar("T")

__all__ = ["OffloadPool", "cooperate", "on_gevent_hub"]


_native_get_ident: Callable[[], int] | None = None


def on_gevent_hub() -> bool:
    """True when called from a greenlet of the thread that runs the gevent hub."""
    global _native_get_ident
    if not gevent_patched():
        return False
    hub_module = sys.modules.get("gevent._hub_local")
    hub = hub_module.get_hub_if_exists() if hub_module is not None else None
    if hub is None:
        return False
    if _native_get_ident is None:
        from gevent import monkey

        _native_get_ident = monkey.get_original("_thread", "get_ident")
    return bool(hub.thread_ident == _native_get_ident())


def cooperate() -> None:
    """Let the hub run other greenlets now (on the hub; a no-op anywhere else).

    A fast client's request body is always ready, so socket reads never block
    and never switch greenlets: a loop reading an upload must yield by itself or
    it holds every stream of the worker until the whole body is in.
    """
    if on_gevent_hub():
        import gevent

        gevent.sleep(0)


class OffloadPool:
    """A few native threads of its own for one kind of blocking work.

    Work that is mostly Python (boto3 builds, signs and parses every request)
    holds the GIL while it runs; eight such threads at once starve the hub's
    thread of it. A small pool bounds that contention (and queues the rest
    cooperatively). Made lazily in each process, on the hub's thread.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._pool: Any = None
        self._pid = 0

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        if not on_gevent_hub():
            return fn(*args)
        if self._pool is None or self._pid != os.getpid():
            from gevent.threadpool import ThreadPool

            self._pool, self._pid = ThreadPool(self.size), os.getpid()
        # gevent's pool prints a traceback for every exception a task raises, even an
        # expected one (an S3 404, a full disk): hand the exception back as a value.
        outcome = self._pool.apply(_capture, (fn, args))
        if isinstance(outcome, _Raised):
            raise outcome.exc
        result: T = outcome
        return result


class _Raised:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _capture(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        return fn(*args)
    except Exception as exc:
        return _Raised(exc)
