"""Store page latency vs. table size: ``python -m bench.store_bench``.

For SQLite and PostgreSQL (a throwaway cluster, see :mod:`bench.pgcluster`) and
100 / 10k / 100k rows, time ``load_thread_items`` and ``load_threads`` pages
(limit 20, newest first) - the first page and a page after a cursor 90% deep -
through the real async store (so the worker-thread hop is included). Prints a
markdown table with medians and the 100k/100 ratio (keyset pages should stay
roughly flat: target <= ~2x).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from chatkit.types import AssistantMessageContent, AssistantMessageItem, ThreadMetadata

from flask_chatkit.storage.sql import SQLAlchemyStore

from .pgcluster import ClusterUnavailable, PostgresCluster

__all__ = ["format_table", "run_store_bench"]

SIZES = (100, 10_000, 100_000)
LIMIT = 20
OWNER = "bench-user"
CONTEXT = SimpleNamespace(user_id=OWNER)
T0 = datetime(2024, 1, 1)
BATCH = 5_000


def _rows(n: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(thread row, item row) pairs; all items go to thread thr_0."""
    for k in range(n):
        at = T0 + timedelta(seconds=k)
        thread = ThreadMetadata(id=f"thr_{k}", created_at=at, title=f"Thread {k}")
        item = AssistantMessageItem(
            id=f"msg_{k}", thread_id="thr_0", created_at=at,
            content=[AssistantMessageContent(text=f"message {k} " + "lorem ipsum " * 8)],
        )
        yield (
            {"owner": OWNER, "id": thread.id, "created_at": at,
             "payload": thread.model_dump(mode="json")},
            {"owner": OWNER, "thread_id": "thr_0", "id": item.id, "created_at": at,
             "payload": item.model_dump(mode="json")},
        )


def _fill(store: SQLAlchemyStore, n: int) -> None:
    store.create_all()
    threads: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    with store.engine.begin() as conn:
        for thread_row, item_row in _rows(n):
            threads.append(thread_row)
            items.append(item_row)
            if len(threads) >= BATCH:
                conn.execute(store.threads.insert(), threads)
                conn.execute(store.items.insert(), items)
                threads, items = [], []
        if threads:
            conn.execute(store.threads.insert(), threads)
            conn.execute(store.items.insert(), items)
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")


def _median_ms(call: Callable[[], Coroutine[Any, Any, Any]], runs: int) -> float:
    async def measure() -> list[float]:
        for _ in range(5):
            await call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            await call()
            times.append((time.perf_counter() - start) * 1000)
        return times

    return statistics.median(asyncio.run(measure()))


def _bench_one(store: SQLAlchemyStore, n: int, runs: int) -> dict[str, float]:
    deep = f"{n // 10}"  # newest first: 90% of the way through the listing
    ops: dict[str, Callable[[], Coroutine[Any, Any, Any]]] = {
        "items.list first page": lambda: store.load_thread_items(
            "thr_0", None, LIMIT, "desc", CONTEXT),
        "items.list deep cursor": lambda: store.load_thread_items(
            "thr_0", f"msg_{deep}", LIMIT, "desc", CONTEXT),
        "threads.list first page": lambda: store.load_threads(LIMIT, None, "desc", CONTEXT),
        "threads.list deep cursor": lambda: store.load_threads(
            LIMIT, f"thr_{deep}", "desc", CONTEXT),
    }
    return {name: _median_ms(op, runs) for name, op in ops.items()}


@contextmanager
def _backends(workdir: Path) -> Iterator[dict[str, Callable[[str], str] | None]]:
    cluster: PostgresCluster | None = None
    try:
        cluster = PostgresCluster.create()
    except ClusterUnavailable as exc:
        print(f"!!! store bench: PostgreSQL skipped: {exc}", file=sys.stderr)
    try:
        pg = (lambda name: cluster.create_database(name)) if cluster else None
        yield {"sqlite": lambda name: f"sqlite:///{workdir / name}.sqlite3", "postgresql": pg}
    finally:
        if cluster is not None:
            cluster.destroy()


def run_store_bench(
    sizes: tuple[int, ...] | None = None, runs: int | None = None, quick: bool = False
) -> list[dict[str, Any]]:
    """One flat row per (backend, operation): backend, operation, the median page latency
    in ms per size (``"100 rows (ms)"``, ...) and the largest/smallest ratio
    (``"100k/100"``). ``quick`` shrinks sizes and runs for a smoke test."""
    sizes = sizes or ((100, 2_000) if quick else SIZES)
    runs = runs or (10 if quick else 30)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chatkit-bench-") as tmp, _backends(
        Path(tmp)
    ) as backends:
        for backend, make_url in backends.items():
            if make_url is None:
                continue
            by_op: dict[str, dict[int, float]] = {}
            for n in sizes:
                store = SQLAlchemyStore(make_url(f"bench_{n}"))
                try:
                    _fill(store, n)
                    for op, ms in _bench_one(store, n, runs).items():
                        by_op.setdefault(op, {})[n] = ms
                finally:
                    store.close()
                    store.engine.dispose()
            for op, ms_by_size in by_op.items():
                row: dict[str, Any] = {"backend": backend, "operation": f"{op} (limit {LIMIT})"}
                for n in sizes:
                    row[f"{_label(n)} rows (ms)"] = round(ms_by_size[n], 2)
                ratio = ms_by_size[max(sizes)] / ms_by_size[min(sizes)]
                row[f"{_label(max(sizes))}/{_label(min(sizes))}"] = round(ratio, 2)
                results.append(row)
    return results


def _label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 else str(n)


def format_table(results: list[dict[str, Any]]) -> str:
    """The rows of :func:`run_store_bench` as a markdown table."""
    if not results:
        return "(no store benchmark results)"
    head = list(results[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        cells[-1] += "x"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    results = run_store_bench()
    print(format_table(results))
    print(f"\n(store bench took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
