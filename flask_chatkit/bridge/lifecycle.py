"""Deploys: a gunicorn worker told to stop cancels its open streams before it is killed.

What gunicorn does (arbiter.py, workers/base.py, ggevent.py, gthread.py):

- Master SIGTERM (shutdown): the master closes its listeners, sends SIGTERM to every
  worker and SIGKILLs whatever is still alive exactly ``graceful_timeout`` later.
- HUP reload: new workers start, the old ones get SIGTERM; the master waits up to
  ``graceful_timeout`` for them but never SIGKILLs them: they stop on their own.
- ``max_requests``: the worker sets ``alive = False`` itself, no signal at all.
- The gevent worker notices ``alive = False`` within its 1 s sleep, closes its
  servers, waits for handlers up to ``graceful_timeout`` (1 s steps), then
  ``server.stop(timeout=1)`` kills the handler greenlets: later than the master's
  SIGKILL, so on a shutdown no stream was ever cancelled and nothing was saved.
- The gthread worker waits up to ``graceful_timeout`` for its connections, then
  returns; the interpreter then joins the pool threads, still inside their
  streams, until the SIGKILL.

So the worker cancels its streams itself. The stop is seen at once (the worker's
SIGTERM/SIGQUIT/SIGINT handlers are wrapped) or within ``POLL_INTERVAL`` (``alive``
is polled, which also catches ``max_requests``). Streams still open
``graceful_timeout - CHATKIT_CANCEL_TIMEOUT - STOP_MARGIN`` seconds after the stop
are cancelled: ChatKit's ``handle_stream_cancelled`` saves each partial reply and
its "stream cancelled" marker, the responses end, and the worker exits early.
Replies that end before then finish normally. A quick stop (SIGQUIT, SIGINT)
cancels at once. Outside gunicorn only the exit hook remains.

Imports nothing of Flask.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loop import LoopThread

logger = logging.getLogger("flask_chatkit")

# Covers signal delivery (gevent runs Python signal handlers within ~0.3 s), the
# alive poll below and the loop's own latency, between the stop and our cancel.
STOP_MARGIN = 1.0
POLL_INTERVAL = 0.25
_QUICK_STOP = (signal.SIGQUIT, signal.SIGINT)


@dataclass(frozen=True)
class StopPlan:
    """When a stopping worker cancels the streams still open."""

    graceful_timeout: float
    cancel_timeout: float
    margin: float = STOP_MARGIN

    @property
    def fits(self) -> bool:
        """Saving may take the whole CHATKIT_CANCEL_TIMEOUT before the SIGKILL."""
        return self.graceful_timeout - self.cancel_timeout - self.margin >= 0

    @property
    def cancel_after(self) -> float:
        """Seconds from the stop to the cancel (at once when the budget does not fit)."""
        return max(0.0, self.graceful_timeout - self.cancel_timeout - self.margin)

    def describe(self) -> str:
        return (
            f"graceful_timeout {self.graceful_timeout:g} s, CHATKIT_CANCEL_TIMEOUT "
            f"{self.cancel_timeout:g} s, margin {self.margin:g} s"
        )


def find_gunicorn_worker() -> Any | None:
    """The gunicorn worker this process is, found through its SIGTERM handler."""
    base = sys.modules.get("gunicorn.workers.base")
    if base is None:
        return None
    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return owner if isinstance(owner, base.Worker) else None


# CPython 3.10 to 3.12's thresholds. An app that set its own keeps them; so does a
# newer interpreter, whose collector was not measured here.
_INTERPRETER_GC_THRESHOLDS = (700, 10, 10)
#: The young generation's threshold in a gunicorn worker: a young collection every
#: 7,000 net allocations instead of every 700 (figures: ``docs/benchmarks.md``).
WORKER_GC_THRESHOLD = 7_000


def tune_worker_gc() -> None:
    """Set the garbage collector up for a worker that serves many streams at once.

    * **Start-up objects are frozen.** A full (oldest-generation) collection walks
      every tracked object and holds the GIL throughout: in a worker with the SDK,
      SQLAlchemy and boto3 loaded that is a pause every open stream of the worker
      feels as a gap between deltas. Objects alive once the app is loaded are
      modules, classes and the app itself, which live as long as the worker:
      ``gc.freeze()`` moves them to a permanent generation, so later passes walk
      only what requests create.
    * **Young collections run a tenth as often.** Each event of each stream
      allocates (pydantic models, asyncio handles, async-generator steps), so at
      the default threshold a worker with hundreds of open streams runs a young
      collection every few milliseconds, and each one also walks the suspended
      streams' young objects. Most of what a request allocates is freed by
      reference counting long before a tenfold threshold is reached. Only when
      the thresholds are still the interpreter's: ``gc.set_threshold`` in the app
      (before ``init_app``) or in a gunicorn ``post_fork`` hook wins.
    """
    gc.collect()
    gc.freeze()
    if gc.get_threshold() == _INTERPRETER_GC_THRESHOLDS:
        gc.set_threshold(WORKER_GC_THRESHOLD, *_INTERPRETER_GC_THRESHOLDS[1:])


class WorkerLifecycle:
    """Hooks the stop path of the gunicorn worker the process runs in (once per pid)."""

    def __init__(self, loop_thread: LoopThread) -> None:
        self._loop_thread = loop_thread
        self._cancel_timeout = 0.0
        self._watching = False
        self._pid: int | None = None
        self._worker: Any = None
        self._graceful_timeout = 0.0
        self._cancel_handle: asyncio.TimerHandle | None = None
        self._cancel_at: float | None = None
        self._cancelling: asyncio.Task[None] | None = None

    @property
    def plan(self) -> StopPlan | None:
        """This worker's plan, or None outside a gunicorn worker."""
        if self._pid != os.getpid():
            return None
        # Built when asked: an app initialised later may bring a longer cancel timeout.
        return StopPlan(self._graceful_timeout, self._cancel_timeout)

    def watch(self, cancel_timeout: float) -> None:
        """Called by ``init_app``: the longest CHATKIT_CANCEL_TIMEOUT of the process wins."""
        self._cancel_timeout = max(self._cancel_timeout, cancel_timeout)
        if not self._watching:
            self._watching = True
            self._loop_thread.add_start_hook(self._loop_started)
            # Last resort (other servers, a worker that exits some other way).
            atexit.register(self._at_exit)
        self._attach()

    def _attach(self) -> None:
        pid = os.getpid()
        if self._pid == pid:
            return
        worker = find_gunicorn_worker()
        if worker is None:
            return  # not (yet) in a worker: e.g. --preload loads the app in the master
        self._pid, self._worker = pid, worker
        tune_worker_gc()
        self._cancel_handle = self._cancel_at = self._cancelling = None
        self._graceful_timeout = float(worker.cfg.graceful_timeout)
        plan = StopPlan(self._graceful_timeout, self._cancel_timeout)
        for signum in (signal.SIGTERM, *_QUICK_STOP):
            self._wrap_handler(signum)
        if plan.fits:
            worker.log.debug(
                "flask-chatkit: streams still open %.1f s after a stop are cancelled (%s)",
                plan.cancel_after,
                plan.describe(),
            )
        else:
            worker.log.warning(
                "flask-chatkit: CHATKIT_CANCEL_TIMEOUT does not fit in gunicorn's "
                "graceful_timeout (%s): open streams are cancelled as soon as the worker "
                "is told to stop. Raise --graceful-timeout or lower CHATKIT_CANCEL_TIMEOUT "
                "so replies may finish during a deploy.",
                plan.describe(),
            )

    def _wrap_handler(self, signum: int) -> None:
        previous = signal.getsignal(signum)
        quick = signum in _QUICK_STOP

        def on_signal(sig: int, frame: Any) -> None:
            # Only hand the time over: no locks or logging inside a signal handler.
            loop = self._loop_thread.current_loop()
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self._stop_began, time.monotonic(), quick, sig)
            if callable(previous):
                previous(sig, frame)

        # ValueError: not the main thread (app loaded lazily): the alive poll remains.
        with contextlib.suppress(ValueError):
            signal.signal(signum, on_signal)

    def _loop_started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._attach()
        if self._pid == os.getpid():
            loop.call_soon_threadsafe(self._poll_alive)

    # -- on the loop -------------------------------------------------------
    def _poll_alive(self) -> None:
        if self._worker is None or self._pid != os.getpid():
            return
        if not self._worker.alive:
            self._stop_began(time.monotonic(), False, None)
        else:
            asyncio.get_running_loop().call_later(POLL_INTERVAL, self._poll_alive)

    def _stop_began(self, at: float, quick: bool, signum: int | None) -> None:
        plan = self.plan
        if plan is None:
            return
        cancel_at = at if quick else at + plan.cancel_after
        if self._cancelling is not None or (
            self._cancel_at is not None and self._cancel_at <= cancel_at
        ):
            return  # an earlier (or the same) stop already decided
        if self._cancel_handle is not None:
            self._cancel_handle.cancel()
        loop = asyncio.get_running_loop()
        self._cancel_at = cancel_at
        delay = max(0.0, cancel_at - time.monotonic())
        how = signal.Signals(signum).name if signum else "alive=False"
        self._worker.log.info(
            "flask-chatkit: worker stopping (%s); %d open streams, those still open in "
            "%.2f s are cancelled and saved (%s)",
            how,
            len(self._loop_thread.open_streams),
            delay,
            plan.describe(),
        )
        self._cancel_handle = loop.call_later(delay, self._start_cancel, at)

    def _start_cancel(self, stopped_at: float) -> None:
        self._cancelling = asyncio.ensure_future(self._cancel_open_streams(stopped_at))

    async def _cancel_open_streams(self, stopped_at: float) -> None:
        started = time.monotonic()
        count, unfinished = await self._loop_thread.open_streams.cancel_all(self._cancel_timeout)
        log = self._worker.log
        log.info(
            "flask-chatkit: cancelled %d open streams %.2f s after the stop; saved in %.3f s",
            count,
            started - stopped_at,
            time.monotonic() - started,
        )
        if unfinished:
            log.warning(
                "flask-chatkit: %d cancelled streams did not finish saving within "
                "CHATKIT_CANCEL_TIMEOUT (%g s)",
                unfinished,
                self._cancel_timeout,
            )

    def _at_exit(self) -> None:
        self._loop_thread.shutdown(timeout=self._cancel_timeout)
