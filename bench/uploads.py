"""Upload throughput and neighbour-stream jitter, disk vs S3: ``python -m bench.uploads``.

For each storage (files on disk; an S3 bucket on a local moto server process)
one ``gunicorn -k gevent`` worker serves flask-chatkit while

1. one client streams a reply (a delta every 10 ms) — alone first (baseline),
   then while ``--uploads`` clients (one process each) upload ``--size`` MiB
   through ``POST /chatkit/attachments`` at once;
2. the same file is read back through ``GET …/content`` (disk: streamed by the
   worker; S3: a 302 to a presigned GET, followed).

Printed: aggregate and single-upload MiB/s, the stream's largest and p99 gap
between deltas without and with the uploads, and read-back MiB/s. Everything
runs on 127.0.0.1, with fixed counts and timeouts. ``--quick``: smaller files.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.gunicorn import RunningServer, start_gunicorn
from tests.http_client import user_input
from tests.reliability.conftest import DELTA, StreamReader, abort, raw_request
from tests.upload_client import release, start_uploads

APP_SPEC = "bench.uploads:upload_app()"
STREAM_DELAY = 0.01


def upload_app() -> Any:
    """flask-chatkit with a fixed user and the storage named by ``BENCH_ATTACHMENTS_*``."""
    from flask import Flask

    from bench.apps import BenchServer, bench_context, make_store
    from flask_chatkit import ChatKit

    app = Flask("bench_uploads")
    app.config.update(
        CHATKIT_CREATE_TABLES=False,
        CHATKIT_ATTACHMENTS_DIR=os.environ["BENCH_ATTACHMENTS_DIR"],
        CHATKIT_ATTACHMENTS_URL=os.environ.get("BENCH_ATTACHMENTS_URL") or None,
        CHATKIT_MAX_ATTACHMENT_BYTES=int(os.environ["BENCH_MAX_BYTES"]),
        CHATKIT_ALLOWED_MIME_TYPES=["application/octet-stream"],
    )
    chatkit = ChatKit(app, BenchServer, store=make_store())

    @chatkit.context_loader
    def load_context(request: Any, metadata: dict[str, Any]) -> Any:
        return bench_context()

    return app


@dataclass
class Result:
    storage: str
    single_mib_s: float
    many_mib_s: float
    base_max_ms: float
    base_p99_ms: float
    load_max_ms: float
    load_p99_ms: float
    read_mib_s: float
    read_how: str


def gaps_ms(arrivals: list[float]) -> tuple[float, float]:
    gaps = sorted((b - a) * 1000 for a, b in itertools.pairwise(arrivals))
    if not gaps:
        return float("nan"), float("nan")
    return gaps[-1], gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]


class NeighbourStream:
    """A long reply read off a raw socket; records when each delta arrives."""

    def __init__(self, server: RunningServer) -> None:
        body = {"type": "threads.create",
                "params": {"input": user_input(f"words=20000 delay={STREAM_DELAY}")}}
        self.reader = StreamReader(raw_request(server.port, "", body))
        self.arrivals: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            self._read()

    def _read(self) -> None:
        assert self.reader.read_headers() == 200
        while not self.stop.is_set():
            event = self.reader.next_event()
            if event is None:
                return
            if event.get("update", {}).get("type") == DELTA:
                self.arrivals.append(time.monotonic())

    def between(self, start: float, end: float) -> list[float]:
        return [t for t in self.arrivals if start <= t <= end]

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.reader.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv
        self.thread.join(timeout=10)
        abort(self.reader.sock)


def run_uploads(url: str, source: Path, count: int) -> float:
    """``count`` simultaneous uploads of ``source``, each from a process of its own
    (started first, released together); returns the elapsed seconds."""
    procs = start_uploads(f"{url}/chatkit/attachments", str(source), count)
    time.sleep(0.5)  # their interpreters have started
    started = time.monotonic()
    codes = release(procs, timeout=320)
    elapsed = time.monotonic() - started
    if codes != [200] * count:
        raise RuntimeError(f"uploads failed: {codes}")
    return elapsed


def read_back(url: str, source: Path, size: int) -> tuple[float, str]:
    """Upload once more, then time ``GET …/content`` (redirects followed)."""
    with source.open("rb") as handle:
        answer = requests.post(f"{url}/chatkit/attachments", timeout=300,
                               files={"file": ("r.bin", handle, "application/octet-stream")})
    answer.raise_for_status()
    content = f"{url}/chatkit/attachments/{answer.json()['id']}/content"
    started = time.monotonic()
    first = requests.get(content, timeout=300, allow_redirects=False, stream=True)
    answered_ms = (time.monotonic() - started) * 1000
    first.close()
    started = time.monotonic()
    response = requests.get(content, timeout=300)
    elapsed = time.monotonic() - started
    assert len(response.content) == size
    if response.history:
        how = f"302 in {answered_ms:.1f} ms, then the bucket"
    else:
        how = f"streamed by the worker (headers in {answered_ms:.1f} ms)"
    return size / (1024 * 1024) / elapsed, how


@contextmanager
def serving(tmp: Path, storage: str, size: int, s3_env: dict[str, str] | None,
            bucket: str | None) -> Iterator[RunningServer]:
    env = {
        "BENCH_DB": str(tmp / f"{storage}.sqlite3"),
        "BENCH_ATTACHMENTS_DIR": str(tmp / f"{storage}-files"),
        "BENCH_MAX_BYTES": str(size),
    }
    if storage == "s3":
        assert s3_env is not None and bucket is not None
        env.update(s3_env)
        env["BENCH_ATTACHMENTS_URL"] = f"s3://{bucket}/bench"
    from bench.apps import make_store

    os.environ["BENCH_DB"] = env["BENCH_DB"]
    make_store().close()  # the tables, before the worker starts
    with start_gunicorn(tmp, APP_SPEC, env=env) as server:
        yield server


def measure(tmp: Path, storage: str, size_mib: int, uploads: int,
            s3_env: dict[str, str] | None = None, bucket: str | None = None) -> Result:
    size = size_mib * 1024 * 1024
    source = tmp / "payload.bin"
    if not source.exists() or source.stat().st_size != size:
        source.write_bytes(os.urandom(size))
    with serving(tmp, storage, size, s3_env, bucket) as server:
        run_uploads(server.url, source, 1)  # warm-up: imports, first connections
        single = size_mib / run_uploads(server.url, source, 1)
        stream = NeighbourStream(server)
        stream.thread.start()
        time.sleep(1.0)
        base_start = time.monotonic()
        time.sleep(2.0)
        base_end = time.monotonic()
        elapsed = run_uploads(server.url, source, uploads)
        load_end = base_end + elapsed
        stream.close()
        read_mib_s, how = read_back(server.url, source, size)
    base_max, base_p99 = gaps_ms(stream.between(base_start, base_end))
    load_max, load_p99 = gaps_ms(stream.between(base_end, load_end))
    return Result(storage, single, uploads * size_mib / elapsed, base_max, base_p99,
                  load_max, load_p99, read_mib_s, how)


HEADERS = ["storage", "1 upload MiB/s", "N uploads at once MiB/s", "gap max/p99 idle ms",
           "gap max/p99 uploading ms", "read-back MiB/s", "read-back"]


def table_rows(results: list[Result]) -> list[list[str]]:
    return [[r.storage, f"{r.single_mib_s:.0f}", f"{r.many_mib_s:.0f}",
             f"{r.base_max_ms:.1f} / {r.base_p99_ms:.1f}",
             f"{r.load_max_ms:.1f} / {r.load_p99_ms:.1f}",
             f"{r.read_mib_s:.0f}", r.read_how] for r in results]


def render(results: list[Result], uploads: int, size_mib: int) -> str:
    head = (f"Uploads: {uploads} x {size_mib} MiB at once through POST /chatkit/attachments "
            f"(one process each), one gunicorn -k gevent worker; neighbour stream: a delta every "
            f"{STREAM_DELAY * 1000:.0f} ms")
    rows = [HEADERS, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
             for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join([head, "", *lines])


def collect(storage: str, uploads: int, size_mib: int) -> list[Result]:
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="chatkit-bench-uploads-") as name:
        tmp = Path(name)
        if storage in ("disk", "both"):
            results.append(measure(tmp, "disk", size_mib, uploads))
        if storage in ("s3", "both"):
            from tests.gunicorn import stop_process
            from tests.s3 import start_s3_server

            moto = start_s3_server(tmp)
            try:
                bucket = moto.create_bucket()
                results.append(measure(tmp, "s3", size_mib, uploads, moto.env, bucket))
            finally:
                stop_process(moto.proc)
    return results


def run(quick: bool = False) -> tuple[list[str], list[list[str]]]:
    """For ``python -m bench`` (section U): 8 x 20 MiB, or 4 x 5 MiB when quick."""
    uploads, size_mib = (4, 5) if quick else (8, 20)
    headers = [h.replace("N uploads", f"{uploads} x {size_mib} MiB uploads") for h in HEADERS]
    return headers, table_rows(collect("both", uploads, size_mib))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=8)
    parser.add_argument("--size", type=int, default=20, help="MiB per upload")
    parser.add_argument("--quick", action="store_true", help="4 x 5 MiB")
    parser.add_argument("--storage", choices=["disk", "s3", "both"], default="both")
    args = parser.parse_args(argv)
    if args.quick:
        args.uploads, args.size = 4, 5
    print(render(collect(args.storage, args.uploads, args.size), args.uploads, args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
