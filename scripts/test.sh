#!/usr/bin/env bash
# `make test` after lint and docs: the pytest suite and, beside it, `make test-min` (the
# unit tests against the lowest versions pyproject.toml allows). The suite spends most of
# its time waiting on the servers it starts; test-min is mostly CPU work, so the two
# together take about the time of the suite alone (one after the other was ~2.5 min more).
# test-min's output is printed when it ends; either one failing fails the run. test-min
# runs in a session of its own, stopped (with all it started) on every path out of here.
set -euo pipefail
cd "$(dirname "$0")/.."
min_log=$(mktemp)
setsid make --no-print-directory test-min >"$min_log" 2>&1 </dev/null &
min_pid=$!
stop_min() {
    kill -TERM -- "-$min_pid" 2>/dev/null || true
    sleep 1
    kill -KILL -- "-$min_pid" 2>/dev/null || true
    rm -f "$min_log"
}
trap stop_min EXIT
status=0
.venv/bin/pytest "$@" || status=$?
min_status=0
wait "$min_pid" || min_status=$?
echo "---- make test-min (ran beside pytest) ----"
cat "$min_log"
if [ "$min_status" -ne 0 ]; then
    echo "make test: test-min FAILED (exit $min_status)" >&2
fi
[ "$status" -eq 0 ] && [ "$min_status" -eq 0 ]
