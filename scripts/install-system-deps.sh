#!/usr/bin/env bash
# System packages the test suite needs, from Debian, installed only when absent:
#   - PostgreSQL server binaries (tests start throwaway clusters with initdb/pg_ctl)
#   - Chromium and its driver (browser tests)
#   - nginx (the reverse-proxy integration test runs it as its own process, never as a service)
# Idempotent. Never fails the build: when packages cannot be installed it prints a
# loud warning and the tests that need them skip (loudly).
set -u

missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    missing+=(postgresql)
fi
if [ ! -x /usr/bin/chromium ]; then
    missing+=(chromium chromium-driver)
fi
if [ ! -x /usr/sbin/nginx ]; then
    missing+=(nginx)
fi

if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: PostgreSQL, Chromium and nginx already installed."
    exit 0
fi

warn() {
    echo "" >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "!!! system-deps: $*" >&2
    echo "!!! Tests needing: ${missing[*]} will be SKIPPED." >&2
    echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!" >&2
    echo "" >&2
}

if [ "$(id -u)" -ne 0 ]; then
    warn "not root; cannot apt-get install ${missing[*]} (run 'sudo make system-deps')."
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    warn "apt-get not available; install ${missing[*]} yourself."
    exit 0
fi

echo "system-deps: installing ${missing[*]} ..."
export DEBIAN_FRONTEND=noninteractive
# Keep Debian from creating and starting its default cluster: tests make their own.
mkdir -p /etc/postgresql-common/createcluster.d
if [ ! -e /etc/postgresql-common/createcluster.d/50-chatkit-no-cluster.conf ]; then
    echo "create_main_cluster = false" \
        > /etc/postgresql-common/createcluster.d/50-chatkit-no-cluster.conf
fi
# No service starts during installation (containers have no init anyway).
policy_rc=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy_rc" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy_rc" && chmod +x "$policy_rc" && created_policy=1
fi

log=$(mktemp)
if apt-get update -qq >"$log" 2>&1 \
    && apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"$log" 2>&1; then
    echo "system-deps: installed ${missing[*]}."
else
    tail -n 30 "$log" >&2
    warn "apt-get failed to install ${missing[*]}."
fi
rm -f "$log"
if [ "$created_policy" -eq 1 ]; then
    rm -f "$policy_rc"
fi
exit 0
