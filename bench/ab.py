"""A/B runs of section B's streams: configurations alternate round by round, one process.

    python -m bench.ab STREAMS ROUNDS NAME:HOST[:KEY=VALUE,...] ...

e.g. ``python -m bench.ab 500 5 on:flask off:flask:BENCH_CHECKPOINT_SECONDS=0
uv:uvicorn-fixed``; ``'hb:flask:BENCH_CONFIG={"CHATKIT_HEARTBEAT_SECONDS":0}'`` sets
any config as JSON (one key: commas separate the pairs). Each configuration is its own
server (HOST as in ``bench.servers``, the KEY=VALUE pairs in its environment, read by
``bench.apps``). ``BENCH_AB_POSTGRES=1`` runs them on PostgreSQL (one throwaway
cluster, a database per configuration) instead of SQLite files. Runs of the whole bench
an hour apart differ by more than many changes are worth; alternating rounds in one run
and taking medians is how the candidates in ANALYSIS.md were compared.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import ExitStack

from bench import loadgen, servers
from bench.sections import _many_streams, run


def _parse(spec: str) -> tuple[str, str, dict[str, str]]:
    name, host, *rest = spec.split(":")
    env = dict(kv.split("=", 1) for kv in ":".join(rest).split(",") if kv)
    return name, host, env


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__)
        return 2
    streams, rounds = int(argv[0]), int(argv[1])
    configs = [_parse(spec) for spec in argv[2:]]
    loadgen.raise_fd_limit()
    body = loadgen.create_body("words=25 delay=0.2")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in configs}
    with ExitStack() as stack:
        cluster = None
        if os.environ.get("BENCH_AB_POSTGRES") == "1":  # each configuration its own database
            from bench.pgcluster import PostgresCluster

            cluster = stack.enter_context(PostgresCluster.create())
        started = {}
        for name, host, env in configs:
            saved = dict(os.environ)
            os.environ.update(env)
            try:
                db_url = cluster.create_database() if cluster is not None else None
                started[name] = stack.enter_context(servers.run_server(host, db_url=db_url))
            finally:
                os.environ.clear()
                os.environ.update(saved)
            run(_many_streams(started[name].port, 50, body, timeout=70))  # warm-up
        for round_no in range(rounds):
            for name, _, _ in configs:
                server = started[name]
                cpu = server.cpu_seconds()
                out = run(_many_streams(server.port, streams, body, timeout=70))
                cpu_ms = (server.cpu_seconds() - cpu) / streams * 1000
                ttfe = [r.ttfe for r in out if r.ttfe is not None]
                first = [r.first_delta for r in out if r.first_delta is not None]
                failed = sum(1 for r in out if r.error or not r.done)
                results[name].append((_pct(ttfe, 0.99), _pct(first, 0.99), cpu_ms))
                print(f"{name:12s} round {round_no + 1}: failed {failed}, TTFE p99 "
                      f"{_pct(ttfe, 0.99):.0f} ms, first delta p99 {_pct(first, 0.99):.0f} ms, "
                      f"CPU {cpu_ms:.2f} ms/stream", flush=True)
                time.sleep(1)
    for name, rows in results.items():
        print(f"median {name:12s} TTFE p99 {statistics.median(r[0] for r in rows):.0f} ms, "
              f"first delta p99 {statistics.median(r[1] for r in rows):.0f} ms, "
              f"CPU {statistics.median(r[2] for r in rows):.2f} ms/stream")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
