"""What checkpoints cost: ``python -m bench.checkpoints [--streams N] [--quick]``.

For SQLite and PostgreSQL (a throwaway cluster, :mod:`bench.pgcluster`), with
``CHATKIT_CHECKPOINT_SECONDS`` at 2 (the default) and at 0 (off), one
``gunicorn -k gevent`` worker serves ``--streams`` concurrent replies of
``--words`` deltas ``--delay`` seconds apart (default 1,000 replies of 25 words
0.2 s apart: 5 s each, so two checkpoints per reply). Printed per run: the
worker's CPU seconds per stream (utime + stime from ``/proc``), the store writes
during the run (every write call the store got, checkpoints among them) per
second of the run, and how many streams completed. Everything runs on
127.0.0.1, with fixed counts and timeouts. Also section ``K`` of ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from bench import loadgen
from bench.pgcluster import ClusterUnavailable, PostgresCluster
from tests.gunicorn import start_gunicorn

APP_SPEC = "bench.checkpoints:checkpoint_app()"
HEADERS = ["database", "checkpoints", "streams ok", "CPU ms / stream", "writes / s",
           "checkpoint writes", "checkpoint transactions", "run s"]
_WRITES = ("save_thread", "add_thread_item", "save_item", "save_checkpoint")


def checkpoint_app() -> Any:
    """flask-chatkit with a fixed user, on ``BENCH_DATABASE_URL``, counting store writes."""
    from flask import Flask, jsonify

    from bench.apps import ONE_USER_LOAD, BenchServer, bench_context
    from flask_chatkit import ChatKit, SQLAlchemyStore

    counts = dict.fromkeys(_WRITES, 0)
    batches = {"save_checkpoints": 0}

    class CountingStore(SQLAlchemyStore):
        async def save_thread(self, *args: Any, **kwargs: Any) -> None:
            counts["save_thread"] += 1  # on the loop thread only: no lock needed
            await super().save_thread(*args, **kwargs)

        async def add_thread_item(self, *args: Any, **kwargs: Any) -> None:
            counts["add_thread_item"] += 1
            await super().add_thread_item(*args, **kwargs)

        async def save_item(self, *args: Any, **kwargs: Any) -> None:
            counts["save_item"] += 1
            await super().save_item(*args, **kwargs)

        async def save_checkpoints(self, rows: Any) -> None:
            counts["save_checkpoint"] += len(rows)  # rows written
            batches["save_checkpoints"] += 1  # transactions: all streams' rows at a tick
            await super().save_checkpoints(rows)

    # Tables are made on first use (CHATKIT_CREATE_TABLES), as in the integration tests.
    store = CountingStore(os.environ["BENCH_DATABASE_URL"])
    app = Flask("bench_checkpoints")
    app.config.update(
        CHATKIT_CHECKPOINT_SECONDS=float(os.environ["BENCH_CHECKPOINT_SECONDS"]),
        **ONE_USER_LOAD,
    )
    chatkit = ChatKit(app, BenchServer, store=store)

    @chatkit.context_loader
    def load_context(request: Any, metadata: dict[str, Any]) -> Any:
        return bench_context()

    @app.get("/_bench/writes")
    def writes() -> Any:
        return jsonify({**counts, **batches})

    return app


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writes(url: str) -> dict[str, int]:
    return dict(requests.get(f"{url}/_bench/writes", timeout=30).json())


async def _streams(port: int, count: int, text: str, timeout: float) -> list[Any]:
    body = loadgen.create_body(text)
    return list(await asyncio.gather(*(
        loadgen.stream(port, "/chatkit", body, timeout=timeout) for _ in range(count)
    )))


def measure(database: str, url: str, seconds: float, streams: int, words: int,
            delay: float, workdir: Path) -> list[Any]:
    env = {"BENCH_DATABASE_URL": url, "BENCH_CHECKPOINT_SECONDS": str(seconds)}
    extra = ["--worker-connections", str(streams + 100), "--backlog", "4096",
             "--log-level", "warning", "--access-logfile", "/dev/null"]
    text = f"words={words} delay={delay}"
    with start_gunicorn(workdir, APP_SPEC, env=env, extra_args=extra) as server:
        (pid,) = server.worker_pids()
        asyncio.run(_streams(server.port, 5, text, 60))  # warm-up: imports, pool, caches
        cpu, before = _cpu_seconds(pid), _writes(server.url)
        started = time.monotonic()
        results = asyncio.run(_streams(server.port, streams, text, 120 + words * delay))
        took = time.monotonic() - started
        cpu, after = _cpu_seconds(pid) - cpu, _writes(server.url)
    done = [r for r in results if r.done and r.error is None]
    writes = sum(after[k] - before[k] for k in _WRITES)
    checkpoints = after["save_checkpoint"] - before["save_checkpoint"]
    transactions = after["save_checkpoints"] - before["save_checkpoints"]
    label = f"every {seconds:g} s" if seconds else "off"
    return [database, label, f"{len(done)}/{streams}", round(cpu / streams * 1000, 2),
            round(writes / took, 1), checkpoints, transactions, round(took, 1)]


@contextmanager
def _databases(workdir: Path) -> Iterator[list[tuple[str, Any]]]:
    cluster: PostgresCluster | None = None
    try:
        cluster = PostgresCluster.create()
    except ClusterUnavailable as exc:
        print(f"!!! checkpoint bench: PostgreSQL skipped: {exc}", file=sys.stderr)
    try:
        backends: list[tuple[str, Any]] = [
            ("sqlite", lambda name: f"sqlite:///{workdir / name}.sqlite3")]
        if cluster is not None:
            backends.append(("postgresql", cluster.create_database))
        yield backends
    finally:
        if cluster is not None:
            cluster.destroy()


def run(quick: bool = False, streams: int | None = None, words: int = 25,
        delay: float = 0.2, seconds: float = 2.0) -> tuple[list[str], list[list[Any]]]:
    streams = streams or (100 if quick else 1000)
    loadgen.raise_fd_limit()
    rows = []
    with tempfile.TemporaryDirectory(prefix="chatkit-ckpt-") as tmp, _databases(
        Path(tmp)
    ) as backends:
        for database, make_url in backends:
            for n, interval in enumerate((seconds, 0.0)):  # on, then off: each on a fresh db
                url = make_url(f"ckpt_{database}_{n}")
                try:
                    rows.append(measure(database, url, interval, streams, words, delay, Path(tmp)))
                except Exception as exc:  # e.g. the worker died: say so, measure the rest
                    label = f"every {interval:g} s" if interval else "off"
                    rows.append([database, label, f"failed: {type(exc).__name__}: {exc}",
                                 "", "", "", ""])
                print(rows[-1], file=sys.stderr, flush=True)
    return HEADERS, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=None, help="default 1000 (quick: 100)")
    parser.add_argument("--words", type=int, default=25)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=2.0, help="CHATKIT_CHECKPOINT_SECONDS")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    headers, rows = run(args.quick, args.streams, args.words, args.delay, args.seconds)
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
