#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests: on 127.0.0.1, a free port, a temporary directory, a password.
#
#   eval "$(tests/pg.sh start)"   # installs Debian's postgresql if need be, starts it, prints the exports
#   .venv/bin/pytest -q           # tests that need PostgreSQL read CLUSTERCTL_TEST_PG_URL
#   tests/pg.sh stop              # stops it and removes its directory (CLUSTERCTL_TEST_PG_DIR)
#
# The exports: CLUSTERCTL_TEST_PG_URL (the superuser's URL, password included), CLUSTERCTL_TEST_PG_DIR
# (the directory) and CLUSTERCTL_TEST_PG_CTL (pg_ctl for this server, as its owner: the database
# restart test stops and starts it). As root the server runs as the `postgres` user, which initdb needs.
set -euo pipefail

bindir() {
    local found
    found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$found" ] && echo "$found"
}

start() {
    if ! bindir >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null && apt-get install -y -qq postgresql >/dev/null
    fi
    local bin dir port password owner
    bin=$(bindir)
    dir=$(mktemp -d /tmp/clusterctl-pg.XXXXXX)
    chmod 755 "$dir"
    mkdir "$dir/data"
    # A free port, chosen the way the tests choose theirs.
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    password=$(python3 -c 'import secrets; print(secrets.token_hex(12))')
    echo "$password" >"$dir/pwfile"
    if [ "$(id -u)" = 0 ]; then
        owner=postgres
        chown -R postgres "$dir"
        run=(runuser -u postgres --)
    else
        owner=$(id -un)
        run=()
    fi
    "${run[@]}" "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" --auth=scram-sha-256 \
        --locale=C.UTF-8 -E UTF8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    rm -f "$dir/pwfile"
    # The one command the tests use to stop and start this server, as its owner, with its options.
    cat >"$dir/ctl" <<EOF
#!/bin/sh
exec ${run[*]} "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200 -c fsync=off" "\$@"
EOF
    chmod 755 "$dir/ctl"
    [ "$owner" = postgres ] && chown postgres "$dir/ctl"
    "$dir/ctl" start -w -t 60 >/dev/null || { cat "$dir/server.log" >&2; exit 1; }
    echo "export CLUSTERCTL_TEST_PG_URL='postgresql://postgres:$password@127.0.0.1:$port/postgres'"
    echo "export CLUSTERCTL_TEST_PG_DIR='$dir'"
    echo "export CLUSTERCTL_TEST_PG_CTL='$dir/ctl'"
}

stop() {
    local dir=${CLUSTERCTL_TEST_PG_DIR:?run start first (or set CLUSTERCTL_TEST_PG_DIR)}
    case "$dir" in /tmp/clusterctl-pg.*) ;; *) echo "not a directory of ours: $dir" >&2; exit 2 ;; esac
    if [ -x "$dir/ctl" ]; then
        "$dir/ctl" stop -m fast -w >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
