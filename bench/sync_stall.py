"""``python -m bench.sync_stall``: what a blocking call in one ``respond`` costs its neighbours.

A neighbour stream sends 16 deltas 0.2 s apart. Once they flow, another stream's
``respond`` makes a 2 s blocking call (``time.sleep``), made three ways:

* ``on the loop``      called directly inside ``respond`` (what a newcomer writes);
* ``sync_to_async``    through ``flask_chatkit.sync_to_async``;
* ``asgiref default``  through ``asgiref.sync.sync_to_async`` as shipped
                       (``thread_sensitive=True``).

and then 2 s of CPU-bound work (a busy loop, which never yields to gevent)
through ``sync_to_async`` and through ``asyncio.to_thread``.

Per worker class (``-k gevent``, ``-k gthread --threads 8``; one worker each,
the app of ``tests/sync_app.py``), printed: the stall added to the neighbour
(its longest gap between deltas minus 0.2 s), how long the blocking reply took,
and how long 3 concurrent 1 s calls took (parallel: ~1 s; serialised: ~3 s).
Loopback only; every request is bounded (a hang is reported, not waited for).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tests.gunicorn import start_gunicorn
from tests.http_client import create_request, logged_in_session, sse_events

APP_SPEC = "tests.sync_app:gunicorn_sync_app()"
WORKERS = {
    "gevent": ["--graceful-timeout", "1"],
    "gthread": ["--threads", "8", "--graceful-timeout", "1"],
}
# (label, what blocks, how respond calls it); "cpu" cases skip the concurrency column.
CASES = [
    ("sleep on the loop", "sleep", "direct"),
    ("sleep via sync_to_async", "sleep", "helper"),
    ("sleep via asgiref default", "sleep", "asgiref"),
    ("CPU via sync_to_async", "cpu", "helper"),
    ("CPU via asyncio.to_thread", "cpu", "to_thread"),
]
NEIGHBOUR_WORDS, NEIGHBOUR_DELAY = 16, 0.2  # 3 s: the 2 s call falls inside it
TIMEOUT = 12.0  # per request: a hung call is reported as such
UPDATED = "thread.item.updated"


@dataclass
class Stall:
    stall: float  # seconds added to the neighbour's longest gap between deltas
    reply: str  # the blocking stream's reply text
    took: float  # seconds until the blocking stream ended


def stream(session: requests.Session, url: str, text: str) -> list[tuple[float, dict[str, Any]]]:
    response = session.post(
        f"{url}/chatkit", json=create_request(text), stream=True, timeout=TIMEOUT
    )
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
    return sse_events(response)


def reply_text(events: list[tuple[float, dict[str, Any]]]) -> str:
    return "".join(e["update"]["delta"] for _, e in events if e["type"] == UPDATED)


def neighbour_stall(url: str, blocker: str) -> Stall:
    """Stream a neighbour; once its deltas flow, start ``blocker``; measure the worst gap."""
    neighbour_session = logged_in_session(url, "nina")
    blocker_session = logged_in_session(url, "bert")
    stream(neighbour_session, url, "words=1")  # warm up: first-request costs are not a stall
    flowing = threading.Event()

    def neighbour() -> list[tuple[float, dict[str, Any]]]:
        text = f"words={NEIGHBOUR_WORDS} delay={NEIGHBOUR_DELAY}"
        response = neighbour_session.post(
            f"{url}/chatkit", json=create_request(text), stream=True, timeout=TIMEOUT
        )
        events = []
        for line in response.iter_lines():
            if line.startswith(b"data: "):
                events.append((time.monotonic(), json.loads(line[6:])))
                if sum(e["type"] == UPDATED for _, e in events) == 2:
                    flowing.set()
        return events

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        neighbour_events = pool.submit(neighbour)
        if not flowing.wait(TIMEOUT):
            raise RuntimeError("the neighbour stream never started")
        started = time.monotonic()
        blocked = pool.submit(stream, blocker_session, url, blocker)
        times = [t for t, e in neighbour_events.result() if e["type"] == UPDATED]
        blocker_events = blocked.result()
    if len(times) != NEIGHBOUR_WORDS:
        raise RuntimeError(f"the neighbour sent {len(times)} of {NEIGHBOUR_WORDS} deltas")
    worst = max(b - a for a, b in itertools.pairwise(times))
    return Stall(
        worst - NEIGHBOUR_DELAY, reply_text(blocker_events), blocker_events[-1][0] - started
    )


def concurrent_calls(url: str, mode: str, count: int = 3) -> float:
    """Seconds for ``count`` streams that each block 1 s, all at once."""
    session = logged_in_session(url, "cara")
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        text = f"op=work block=sleep:1 mode={mode}"
        replies = list(pool.map(lambda _: stream(session, url, text), range(count)))
    if any(reply_text(r) != "slept=1" for r in replies):
        raise RuntimeError("a blocking call did not complete")
    return time.monotonic() - started


def _cell(fn: Any) -> str:
    try:
        return str(fn())
    except (requests.Timeout, requests.ConnectionError):
        return f"hung (> {TIMEOUT:.0f} s)"
    except Exception as exc:  # reported in the table, the bench goes on
        return f"failed: {type(exc).__name__}: {str(exc)[:80]}"


def measure(worker_class: str, block: str, mode: str) -> tuple[str, str]:
    """(stall cell, concurrency cell) on a fresh server: a hung call must not taint the next."""
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        env = {"CHATKIT_TEST_DB_URL": f"sqlite:///{tmp / 'app.sqlite3'}"}
        with start_gunicorn(
            tmp,
            app_spec=APP_SPEC,
            env=env,
            worker_class=worker_class,
            extra_args=WORKERS[worker_class],
        ) as server:

            def stall() -> str:
                result = neighbour_stall(server.url, f"op=work block={block}:2 mode={mode}")
                return f"{result.stall * 1000:.0f} ms (reply in {result.took:.2f} s)"

            def together() -> str:
                return f"{concurrent_calls(server.url, mode):.2f} s"

            return _cell(stall), "—" if block == "cpu" else _cell(together)


def run() -> list[list[str]]:
    """One row per (worker class, variant)."""
    rows = []
    for worker_class in WORKERS:
        for label, block, mode in CASES:
            rows.append([f"-k {worker_class}", label, *measure(worker_class, block, mode)])
    return rows


HEADERS = ["worker", "2 s of blocking work", "stall added to a neighbour", "3 x 1 s at once"]


def format_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def main() -> None:
    started = time.monotonic()
    print(format_table(run()))
    print(f"\n(sync stall bench took {time.monotonic() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
