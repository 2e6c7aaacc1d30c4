#!/usr/bin/env bash
# bench/connects.sh — connect + join rate and memory on one node, in-process broker vs Redis
# (what the cluster-wide rate limits, member reads and presence cost a connect; BENCHMARKS.md).
# Usage: bash bench/connects.sh   (after cargo build --release -p parlor -p parlor-bench)
# Tunables: CONNS (10000) BIN (target/release) REDIS_URL (redis://127.0.0.1:6379)
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/target/release}
ulimit -n "$(ulimit -Hn)"
run() { # mode label
  local mode=$1 label=$2 db=/tmp/connbench-$$.db
  rm -f $db*
  PARLOR_LIMITS__MESSAGES_PER_SECOND=1000000 PARLOR_LIMITS__MESSAGES_BURST=1000000 \
  PARLOR_LIMITS__MAX_CONNECTIONS=50000 PARLOR_LIMITS__IP_CONNECTS_PER_SECOND=1000000 \
  PARLOR_LIMITS__IP_CONNECTS_BURST=1000000 PARLOR_LIMITS__IP_MAX_CONNECTIONS=0 \
  PARLOR_LIMITS__IP_MAX_WEBSOCKETS=0 PARLOR_BROKER_PREFIX=connbench-$$-$label \
  taskset -c 0 $BIN/parlor serve --listen 127.0.0.1:18090 --database sqlite://$db --broker "$mode" >/tmp/connbench-$label.log 2>&1 &
  local pid=$!
  for i in $(seq 100); do curl -sf http://127.0.0.1:18090/health >/dev/null && break; sleep 0.1; done
  taskset -c 1 $BIN/parlor-bench idle --url ws://127.0.0.1:18090/ws --pid $pid --conns ${CONNS:-10000} --rooms 100 --procs 2 --settle-secs 1 --label "$label" --json | tail -1
  kill -TERM $pid; wait $pid || true
  rm -f $db*
}
for round in 1 2; do
  run memory memory-$round
  run "${REDIS_URL:-redis://127.0.0.1:6379}" redis-$round
done
