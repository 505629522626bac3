"""The integration test app plus one probe route for the reliability suite.

``gunicorn 'tests.reliability.app:gunicorn_app()'`` serves exactly
``tests.apps.gunicorn_app()`` and adds ``GET /_test/loop``: how many asyncio
tasks are alive on the worker's ChatKit event loop (the probe's own task not
counted), so a test can tell that cancelled streams left no task behind, and
``GET /_test/store/<user_id>/<thread_id>``: a thread's items straight from the
store, hidden ones (the SDK's "stream cancelled" item) included, and
``GET /_test/lifecycle``: the worker's stop plan and collector settings
(bridge/lifecycle.py), and ``GET /_test/hubs``: how many gevent hubs the worker
runs besides its own and the loop thread's, how many threads the store's pool has
started, and whether a SQLite file's group writer started its thread.
``TEST_GC_THRESHOLD`` ("a,b,c") sets the app's own collector thresholds before
``init_app``.
Native thread counts are read from ``/proc/<pid>/status`` by the tests.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
from typing import Any

from flask import Flask, jsonify

from flask_chatkit import RequestContext
from tests.apps import gunicorn_app as base_gunicorn_app


def gunicorn_app() -> Flask:
    if os.environ.get("TEST_GC_THRESHOLD"):  # an app that tunes its own collector
        gc.set_threshold(*(int(n) for n in os.environ["TEST_GC_THRESHOLD"].split(",")))
    app = base_gunicorn_app()

    @app.get("/_test/loop")
    def loop_probe() -> Any:
        state = app.extensions["chatkit"]

        async def count() -> int:
            # The probe runs inside one task of its own (LoopThread.run's runner).
            return len(asyncio.all_tasks()) - 1

        tasks = state.loop_thread.run(count, contextvars.copy_context(), timeout=10)
        return jsonify(pid=os.getpid(), tasks=tasks)

    @app.get("/_test/store/<user_id>/<thread_id>")
    def store_items(user_id: str, thread_id: str) -> Any:
        # Straight from the store: also the hidden items items.list never shows.
        state = app.extensions["chatkit"]
        context = RequestContext(user_id=user_id)

        async def load() -> list[dict[str, Any]]:
            page = await state.store.load_thread_items(thread_id, None, 1000, "asc", context)
            return [item.model_dump(mode="json") for item in page.data]

        items = state.loop_thread.run(load, contextvars.copy_context(), timeout=15)
        return jsonify(items=items)

    @app.get("/_test/lifecycle")
    def lifecycle_probe() -> Any:
        from flask_chatkit.extension import _LIFECYCLE

        plan = _LIFECYCLE.plan
        if plan is None:
            return jsonify(
                pid=os.getpid(),
                plan=None,
                gc_frozen=gc.get_freeze_count(),
                gc_threshold=gc.get_threshold(),
            )
        return jsonify(
            pid=os.getpid(),
            gc_frozen=gc.get_freeze_count(),
            gc_threshold=gc.get_threshold(),
            plan={
                "graceful_timeout": plan.graceful_timeout,
                "cancel_timeout": plan.cancel_timeout,
                "cancel_after": plan.cancel_after,
                "fits": plan.fits,
            },
        )

    @app.get("/_test/hubs")
    def hubs_probe() -> Any:
        # gevent runs a hub on every native thread that ever waited through one of
        # its patched calls (the store's threads, were psycopg to wait cooperatively).
        import gevent
        from gevent.hub import Hub

        from flask_chatkit.bridge.native import native_thread_id

        async def loop_thread() -> int:
            return native_thread_id()

        # With CHATKIT_LOOP = "thread" the loop's own thread may make one (a patched
        # lock it had to wait for): it is not one of the store's threads.
        loop_tid = app.extensions["chatkit"].loop_thread.run(
            loop_thread, contextvars.copy_context(), timeout=10
        )
        main = gevent.get_hub()
        others = [
            o for o in gc.get_objects()
            if isinstance(o, Hub) and o is not main and o.thread_ident != loop_tid
        ]
        # How many native threads the store's pool has started (its calls made on
        # the hub as greenlets start none).
        store = app.extensions["chatkit"].server.store
        store = getattr(store, "inner", store)
        pool = getattr(store, "_pool", None)
        writer = getattr(store, "_writer", None)  # a SQLite file's group writer
        return jsonify(
            other_threads_hubs=len(others),
            store_threads=pool._started if pool is not None else None,
            writer_thread=writer.thread_started if writer is not None else None,
        )

    return app
