#!/usr/bin/env bash
# bench/cluster.sh — Parlor on PostgreSQL and Redis (see BENCHMARKS.md, "Cluster").
#
#   fanout  1 room, N subscribers spread over three nodes (worker i on node i mod 3), the
#           sender on node 0, burst → deliveries/s and latency across nodes
#   senders 1 room, N subscribers, SENDERS senders sending MESSAGES between them, burst:
#           once with everyone on node 0 (one node), once with subscribers and senders
#           spread over the three nodes → deliveries/s of three nodes ÷ one node
#   persist 100 senders on one node with PostgreSQL → acknowledged messages/s
#
# Usage: DATABASE_URL=postgres://postgres@127.0.0.1:5432/test REDIS_URL=redis://127.0.0.1:6379 \
#          bash bench/cluster.sh
# Tunables: SUBS (999) MESSAGES (1000) SENDERS (10) PERSIST_SENDERS (100) PERSIST_MSGS (200)
#           SKIP_BUILD=1 BENCH_OUT=DIR CARGO_TARGET_DIR MACHINE="..."
# The nodes run on CPU 0 and the load generator on CPU 1; PostgreSQL and Redis run where
# the system puts them (they are part of what a cluster costs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SERVER_BIN=$TARGET_DIR/release/parlor
BENCH_BIN=$TARGET_DIR/release/parlor-bench
: "${DATABASE_URL:?set DATABASE_URL to a PostgreSQL server (a database is created there)}"
: "${REDIS_URL:?set REDIS_URL to a Redis server}"
SUBS=${SUBS:-999}
MESSAGES=${MESSAGES:-1000}
SENDERS=${SENDERS:-10}
PERSIST_SENDERS=${PERSIST_SENDERS:-100}
PERSIST_MSGS=${PERSIST_MSGS:-200}
MACHINE=${MACHINE:-2-core rust-svc VM}
OUT=${BENCH_OUT:-/tmp/parlor-cluster-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

[[ -n "${SKIP_BUILD:-}" ]] || (cd "$ROOT" && cargo build --release -p parlor -p parlor-bench)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

DB=parlor_bench_$(date +%s)
psql -q "$DATABASE_URL" -c "CREATE DATABASE $DB" >/dev/null
DB_URL="${DATABASE_URL%/*}/$DB"
PREFIX=parlor-bench-$$
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null || true
}
trap cleanup EXIT

cat >"$OUT/chat.toml" <<'TOML'
[limits]
messages_per_second = 1000000
messages_burst = 1000000
max_connections = 50000
ip_connects_per_second = 1000000
ip_connects_burst = 1000000
ip_max_connections = 0
ip_max_websockets = 0
[[domains]]
id = "demo"
name = "Parlor demo"
visitor_rooms = "open"
allowed_origins = ["*"]
[domains.bot]
enabled = false
# As in run.sh: with hand-off on, each persist sender (a visitor alone in its room of a
# domain without an assistant) would also get the "waiting for a person" notice stored.
[domains.handoff]
enabled = false
TOML

start_node() { # port → pid in PIDS
  local port=$1
  PARLOR_BROKER_PREFIX=$PREFIX taskset -c 0 "$SERVER_BIN" serve --listen "127.0.0.1:$port" \
    --config "$OUT/chat.toml" --database "$DB_URL" --broker "$REDIS_URL" \
    >>"$OUT/node-$port.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do
    curl -fs "http://127.0.0.1:$port/health" >/dev/null && return 0
    sleep 0.1
  done
  echo "node on $port did not start (see $OUT/node-$port.log)" >&2
  exit 1
}

PORTS=(18180 18181 18182)
for p in "${PORTS[@]}"; do start_node "$p"; done
URLS=$(printf 'ws://127.0.0.1:%s/ws,' "${PORTS[@]}")
URLS=${URLS%,}

echo "== fanout across three nodes" >&2
taskset -c 1 "$BENCH_BIN" fanout --url "ws://127.0.0.1:${PORTS[0]}/ws" --sub-urls "$URLS" \
  --procs 3 --subs "$SUBS" --messages "$MESSAGES" --mode burst --label parlor-3-nodes --json \
  | tee -a "$OUT/results.jsonl"

NODE0="ws://127.0.0.1:${PORTS[0]}/ws"
echo "== $SENDERS senders in one room, one node" >&2
taskset -c 1 "$BENCH_BIN" fanout --url "$NODE0" --sub-urls "$NODE0" --sender-urls "$NODE0" \
  --pid "${PIDS[0]}" --procs 3 --subs "$SUBS" --messages "$MESSAGES" --senders "$SENDERS" \
  --mode burst --label parlor-1-node-senders --json | tee -a "$OUT/results.jsonl"

echo "== $SENDERS senders in one room, three nodes" >&2
taskset -c 1 "$BENCH_BIN" fanout --url "$NODE0" --sub-urls "$URLS" --sender-urls "$URLS" \
  --procs 3 --subs "$SUBS" --messages "$MESSAGES" --senders "$SENDERS" \
  --mode burst --label parlor-3-nodes-senders --json | tee -a "$OUT/results.jsonl"

echo "== persist on PostgreSQL (one node)" >&2
taskset -c 1 "$BENCH_BIN" persist --url "ws://127.0.0.1:${PORTS[1]}/ws" --pid "${PIDS[1]}" \
  --senders "$PERSIST_SENDERS" --messages "$PERSIST_MSGS" --window 1 --label parlor-postgres --json \
  | tee -a "$OUT/results.jsonl"

echo "== ten senders: three nodes ÷ one node (target: at least 0.5)" >&2
"$BENCH_BIN" summarize --primary parlor-3-nodes-senders --baseline "parlor-1-node-senders=one node" \
  --date "$(date -u +%Y-%m-%d)" --machine "$MACHINE" "$OUT/results.jsonl" | tee "$OUT/summary.md"
echo "raw lines in $OUT/results.jsonl" >&2
