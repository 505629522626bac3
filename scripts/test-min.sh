#!/usr/bin/env bash
# `make test-min`: the unit tests against the lowest versions pyproject.toml allows, once
# per Python given (default: every python3.1x Debian provides in /usr/bin), each in its own
# venv (.venv-min-3.X). Every runtime dependency and extra but dev is pinned to its lower
# bound exactly (scripts/lower_bounds.py): `--resolution lowest-direct` alone let uv pick
# pydantic 2.12 and opentelemetry-api 1.28 where the bounds said 2.10 and 1.25. The test
# tools (dev) resolve with `--resolution lowest-direct` too, so their bounds are tested
# as well. A bound that cannot install, or fails a unit test or the one real
# `gunicorn -k gevent` chat (the README Quickstart), fails here.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=.venv/bin/uv
[ $# -gt 0 ] || set -- python3
failed=()

test_one() {
    local python=$1 version venv started
    version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    venv=".venv-min-$version"
    started=$(date +%s)
    "$UV" venv -q --clear --python "$python" "$venv"
    .venv/bin/python scripts/lower_bounds.py "$version" > "$venv/lower-bounds.txt"
    sed 's/\[[^]]*\]//' "$venv/lower-bounds.txt" > "$venv/constraints.txt"  # no extras in -c
    "$UV" pip compile -q --resolution lowest-direct --python "$venv/bin/python" \
        pyproject.toml --extra dev -c "$venv/constraints.txt" -o "$venv/requirements.txt"
    "$UV" pip sync -q --compile-bytecode --python "$venv/bin/python" "$venv/requirements.txt"
    "$UV" pip install -q --python "$venv/bin/python" --no-deps -e .
    echo "test-min: $("$venv/bin/python" --version) ($python), lower bounds:" \
        $(tr '\n' ' ' < "$venv/lower-bounds.txt")
    # (the docs build needs the docs tools, which this venv leaves out)
    "$venv/bin/python" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" \
        -m "not integration and not browser and not docs"
    # and one real `gunicorn -k gevent` chat: the lowest gunicorn and gevent serving a stream.
    "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        tests/test_readme.py::test_quickstart_under_gunicorn_gevent
    echo "test-min: Python $version passed in $(( $(date +%s) - started )) s"
}

# Every Python gets its run; the exit status says whether all passed.
# (not `( … ) || …`: that would switch `set -e` off inside the subshell)
for python in "$@"; do
    set +e
    ( set -e; test_one "$python" )
    status=$?
    set -e
    [ "$status" -eq 0 ] || failed+=("$python")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "test-min: FAILED on ${failed[*]}" >&2
    exit 1
fi
