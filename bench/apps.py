"""The benchmark's servers: one ChatKitServer, three hosts.

* ``flask_app()`` — flask-chatkit (run it under ``gunicorn -k gevent``);
* ``fastapi_app()`` — FastAPI exactly as ChatKit's docs show (run under uvicorn);
* ``floor_app()`` — plain Flask without ChatKit: the gevent host's floor.

Both ChatKit hosts run the same :class:`BenchServer` over the same store layout
(:class:`flask_chatkit.SQLAlchemyStore` on a SQLite file, ``BENCH_DB``) with the
same fixed-user context. Environment:

``BENCH_DB``            SQLite file path (required for the ChatKit hosts)
``BENCH_STORE_DELAY``   seconds every store call awaits first (default 0)
``BENCH_POOL_SIZE``     N: a fixed SQLite pool of N connections, no overflow
                        (default: the store's own engine, 5 + 10 overflow)
``BENCH_FIX_ADAPTER``   "1": FastAPI host with ChatKit's per-request
                        ``TypeAdapter(ChatKitReq)`` cached (the fix the
                        flask host has in ``flask_chatkit.web.endpoint``)
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from typing import Any

from flask_chatkit.context import RequestContext
from flask_chatkit.storage.sql import SQLAlchemyStore
from tests.word_server import WordServer

BENCH_USER = "bench"


class BenchServer(WordServer):
    """Streams ``words=N`` deltas, awaiting ``delay=S`` seconds before each one."""


_STORE_METHODS = (
    "load_thread", "save_thread", "load_thread_items", "save_attachment", "load_attachment",
    "delete_attachment", "load_threads", "add_thread_item", "save_item", "load_item",
    "delete_thread", "delete_thread_item",
)


class DelayedStore(SQLAlchemyStore):
    """A SQLAlchemyStore whose every call first really awaits (I/O stand-in)."""

    delay = 0.0


def _delayed(name: str) -> Any:
    original = getattr(SQLAlchemyStore, name)

    @functools.wraps(original)
    async def method(self: DelayedStore, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await original(self, *args, **kwargs)

    return method


for _name in _STORE_METHODS:
    setattr(DelayedStore, _name, _delayed(_name))


def make_store() -> SQLAlchemyStore:
    if os.environ.get("BENCH_SWITCH_INTERVAL"):  # experiments: the GIL switch interval
        import sys

        sys.setswitchinterval(float(os.environ["BENCH_SWITCH_INTERVAL"]))
    url = os.environ.get("BENCH_DB_URL") or "sqlite:///" + os.environ["BENCH_DB"]
    delay = float(os.environ.get("BENCH_STORE_DELAY", "0") or 0)
    pool_size = int(os.environ.get("BENCH_POOL_SIZE", "0") or 0)
    bind: Any = url
    if pool_size:  # a fixed pool (no overflow): the store then runs exactly pool_size threads
        from sqlalchemy import create_engine, event

        from flask_chatkit.storage import schema

        bind = create_engine(
            url, pool_size=pool_size, max_overflow=0,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        event.listen(bind, "connect", schema._sqlite_on_connect(wal=True))
    store: SQLAlchemyStore
    if delay > 0:
        store = DelayedStore(bind)
        store.delay = delay
    else:
        store = SQLAlchemyStore(bind)
    store.create_all()
    return store


# Every bench request is one user's (bench_context): the per-user stream cap would
# refuse all but 20 of a section's streams, where the baseline host has no cap at all.
ONE_USER_LOAD = {"CHATKIT_MAX_STREAMS_PER_USER": 1_000_000}


def bench_context() -> RequestContext:
    return RequestContext(user_id=BENCH_USER)


# -- flask-chatkit -----------------------------------------------------------


def flask_app() -> Any:
    from flask import Flask

    from flask_chatkit import ChatKit

    app = Flask("bench_flask_chatkit")
    app.config.update(CHATKIT_CREATE_TABLES=False, **ONE_USER_LOAD)
    if os.environ.get("CHATKIT_LOOP"):  # experiments: "thread" puts the loop on its own thread
        app.config["CHATKIT_LOOP"] = os.environ["CHATKIT_LOOP"]
    if os.environ.get("BENCH_CHECKPOINT_SECONDS"):  # experiments: checkpoints off or apart
        app.config["CHATKIT_CHECKPOINT_SECONDS"] = float(os.environ["BENCH_CHECKPOINT_SECONDS"])
    if os.environ.get("BENCH_CONFIG"):  # experiments: any config, as JSON
        app.config.update(json.loads(os.environ["BENCH_CONFIG"]))
    if os.environ.get("BENCH_GC_THRESHOLD"):  # experiments: the app's own, e.g. "700-10-10"
        import gc

        gc.set_threshold(*(int(n) for n in os.environ["BENCH_GC_THRESHOLD"].split("-")))
    chatkit = ChatKit(app, BenchServer, store=make_store())

    @chatkit.context_loader
    def load_context(request: Any, metadata: dict[str, Any]) -> RequestContext:
        return bench_context()

    if os.environ.get("BENCH_TRACEMALLOC") == "1":
        add_tracemalloc_route(app)
    return app


def add_tracemalloc_route(app: Any) -> None:
    """Experiments: ``GET /_bench/tracemalloc`` snapshots; the next call returns the diff."""
    import tracemalloc

    tracemalloc.start(25)
    snapshots: list[Any] = []

    @app.get("/_bench/tracemalloc")
    def snapshot() -> Any:
        import gc

        gc.collect()
        snapshots.append(tracemalloc.take_snapshot())
        if len(snapshots) < 2:
            return {"ok": True}
        stats = snapshots[-1].compare_to(snapshots[-2], "traceback")
        top = []
        for stat in stats[:40]:
            frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback]
            top.append({"kib": stat.size_diff / 1024, "count": stat.count_diff,
                        "where": " < ".join(reversed(frames[-8:]))})
        total = sum(s.size_diff for s in stats) / 1024
        return {"total_kib": total, "top": top}


# -- FastAPI / uvicorn, as in ChatKit's docs -----------------------------------


class _CachedTypeAdapter:
    """Stands in for ``pydantic.TypeAdapter`` inside ``chatkit.server``: one per type."""

    _cache: dict[Any, Any] = {}

    def __class_getitem__(cls, item: Any) -> Any:
        return cls

    def __new__(cls, tp: Any, *args: Any, **kwargs: Any) -> Any:
        from pydantic import TypeAdapter

        if args or kwargs:
            return TypeAdapter(tp, *args, **kwargs)
        adapter = cls._cache.get(tp)
        if adapter is None:
            adapter = cls._cache[tp] = TypeAdapter(tp)
        return adapter


def fix_sdk_type_adapter() -> None:
    import chatkit.server

    chatkit.server.TypeAdapter = _CachedTypeAdapter  # type: ignore[attr-defined,misc]


def fastapi_app() -> Any:
    from chatkit.server import StreamingResult
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    if os.environ.get("BENCH_FIX_ADAPTER") == "1":
        fix_sdk_type_adapter()
    server = BenchServer(make_store())
    app = FastAPI()

    async def chatkit_endpoint(request: Request) -> Response:
        context = bench_context()
        result = await server.process(await request.body(), context)
        if isinstance(result, StreamingResult):
            return StreamingResponse(result, media_type="text/event-stream")
        return Response(content=result.json, media_type="application/json")

    # This module's annotations are strings; FastAPI must see the real class.
    chatkit_endpoint.__annotations__["request"] = Request
    app.post("/chatkit")(chatkit_endpoint)
    return app


# -- the floor: plain Flask, no ChatKit --------------------------------------

FLOOR_EVENT = (
    b'data: {"type":"thread.item.updated","item_id":"msg_0123456789abcdef",'
    b'"update":{"type":"assistant_message.content_part.text_delta",'
    b'"content_index":0,"delta":"w0 "}}\n\n'
)


def floor_app() -> Any:
    from flask import Flask, Response, jsonify, request

    app = Flask("bench_floor")

    @app.post("/hello")
    def hello() -> Any:
        request.get_data()
        return jsonify(data=[], has_more=False, after=None)

    @app.post("/stream")
    def stream() -> Any:
        count = int(request.args.get("n", "2000"))

        def events() -> Any:
            for _ in range(count):
                yield FLOOR_EVENT

        return Response(events(), mimetype="text/event-stream")

    return app
