#!/usr/bin/env bash
# bench/positions.sh — what the position checks cost (BENCHMARKS.md): one node on PostgreSQL
# and Redis holds CONNS idle connections in ROOMS rooms (one room each by default, as support
# widgets do) for SETTLE seconds, with broker_position_check_ms at its default (1000) and at
# one hour (the checks off, in effect); reports the server's CPU and the machine's other CPU
# (PostgreSQL, Redis) while idle, and RSS per connection.
# Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/test bash bench/positions.sh
#        (after cargo build --release -p parlor -p parlor-bench)
# Tunables: CONNS (10000) ROOMS (= CONNS) SETTLE (30) ROUNDS (2) BIN (target/release)
#           REDIS_URL (redis://127.0.0.1:6379)
set -euo pipefail
: "${DATABASE_URL:?set DATABASE_URL to a PostgreSQL server (a database per run is created there)}"
BIN=${BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/release}
CONNS=${CONNS:-10000}
ROOMS=${ROOMS:-$CONNS}
ulimit -n "$(ulimit -Hn)"
run() { # interval_ms label
  local every=$1 label=$2 db="parlor_positions_$$_${2//-/_}"
  local url="${DATABASE_URL%/*}/$db"
  psql -q "$DATABASE_URL" -c "CREATE DATABASE $db" >/dev/null
  PARLOR_LIMITS__MESSAGES_PER_SECOND=1000000 PARLOR_LIMITS__MESSAGES_BURST=1000000 \
  PARLOR_LIMITS__MAX_CONNECTIONS=50000 PARLOR_LIMITS__IP_CONNECTS_PER_SECOND=1000000 \
  PARLOR_LIMITS__IP_CONNECTS_BURST=1000000 PARLOR_LIMITS__IP_MAX_CONNECTIONS=0 \
  PARLOR_LIMITS__IP_MAX_WEBSOCKETS=0 PARLOR_BROKER_PREFIX=positions-$$-$label \
  PARLOR_BROKER_POSITION_CHECK_MS=$every \
  taskset -c 0 "$BIN/parlor" serve --listen 127.0.0.1:18091 --database "$url" \
    --broker "${REDIS_URL:-redis://127.0.0.1:6379}" >/tmp/positions-$label.log 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:18091/health >/dev/null && break; sleep 0.1; done
  taskset -c 1 "$BIN/parlor-bench" idle --url ws://127.0.0.1:18091/ws --pid $pid --conns "$CONNS" \
    --rooms "$ROOMS" --procs 2 --settle-secs "${SETTLE:-30}" --label "$label" --json | tail -1
  kill -TERM $pid; wait $pid || true
  psql -q "$DATABASE_URL" -c "DROP DATABASE $db WITH (FORCE)" >/dev/null
}
for round in $(seq "${ROUNDS:-2}"); do
  run 1000 checks-1s-$round
  run 3600000 checks-off-$round
done
