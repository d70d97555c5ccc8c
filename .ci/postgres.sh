#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the sweep tests (tests/test_sweep_postgres.py).
#
#   eval "$(bash .ci/postgres.sh)"      # exports MOE_SCALING_TEST_POSTGRES_URL
#
# Installs the distribution's `postgresql` package when no server binaries are present (apt-get),
# creates a new cluster in a temporary folder (trust authentication, listening on 127.0.0.1 only,
# on the first free port from 54329 up), starts it, creates the database `moe_sweep_test` and prints
# `export MOE_SCALING_TEST_POSTGRES_URL=postgresql://moe@127.0.0.1:PORT/moe_sweep_test` on stdout.
# Everything else goes to stderr, including the command that stops the server again.
set -euo pipefail

log() { echo "postgres.sh: $*" >&2; }

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/pg_ctl" ]; then
  log "installing the postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
BIN="$(bindir)"

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT="${MOE_SCALING_PG_PORT:-54329}"
while ! port_free "$PORT"; do PORT=$((PORT + 1)); done

DATA="$(mktemp -d /tmp/moe-scaling-pg.XXXXXX)"
# initdb and postgres refuse to run as root: run them as the `postgres` user the package creates.
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$DATA"
  as_pg() { su postgres -s /bin/bash -c "$(printf '%q ' "$@")"; }
else
  as_pg() { "$@"; }
fi

as_pg "$BIN/initdb" -D "$DATA/db" -U moe --auth=trust --encoding=UTF8 --no-sync >/dev/null
as_pg "$BIN/pg_ctl" -D "$DATA/db" -l "$DATA/server.log" -w -t 60 \
  -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DATA -c fsync=off -c max_connections=100" start >&2
"$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U moe moe_sweep_test

log "server running on 127.0.0.1:$PORT (data $DATA); stop it with:"
log "  su postgres -s /bin/bash -c '$BIN/pg_ctl -D $DATA/db stop'"
echo "export MOE_SCALING_TEST_POSTGRES_URL=postgresql://moe@127.0.0.1:$PORT/moe_sweep_test"
