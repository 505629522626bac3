#!/usr/bin/env bash
# `make test-stress`: the pytest suite with two busy loops beside it (`nice -n 0`).
# Each loop spins for at most $1 seconds (default 3600) and is killed, by its pid,
# when pytest ends (trap on EXIT covers a failure and Ctrl-C). Extra arguments go to
# pytest, e.g. `bash scripts/test-stress.sh 3600 tests/test_sync.py`.
set -euo pipefail
cd "$(dirname "$0")/.."
max_seconds=${1:-3600}
shift || true
loops=()
stop_loops() {
    for pid in "${loops[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_loops EXIT
for _ in 1 2; do
    # A bounded busy loop: no sleep, no I/O, ends by itself after max_seconds. `nice`
    # execs bash, so $! is the loop's own pid (no wrapper whose kill would orphan it),
    # and its output goes nowhere (an inherited pipe would hold a caller's capture).
    nice -n 0 bash -c 'end=$((SECONDS + $1)); while (( SECONDS < end )); do :; done' \
        busy-loop "$max_seconds" </dev/null >/dev/null 2>&1 &
    loops+=("$!")
done
echo "test-stress: busy loops ${loops[*]} (at most ${max_seconds}s each)"
started=$(date +%s)
status=0
.venv/bin/pytest "$@" || status=$?
echo "test-stress: pytest exited $status after $(( $(date +%s) - started )) s"
exit "$status"
