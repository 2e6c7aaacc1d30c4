#!/usr/bin/env bash
# bench/pusher.sh — Parlor against Soketi and Sockudo in Pusher Channels protocol 7.
#
# The same client (`parlor-bench pusher`) runs against each server in turn: Parlor (the
# release build, embedded SQLite), then Soketi (Node.js, uWebSockets.js), then Sockudo
# (Rust). Each is started fresh for every run, pinned to CPU 0, with the load pinned to
# CPU 1, one server at a time, all with the same app (id `bench`, key `bench-key`, one
# secret of at least 16 bytes, which Parlor requires) and no rate limits in the way:
#
#   idle   19,000 connections, each subscribed to one of 190 public channels
#          → server RSS per connection
#   burst  1,000 subscribers on one channel × 1,000 events published through the HTTP API
#          (POST /apps/bench/events, signed), 8 requests in flight
#          → deliveries/s, latency p99, server CPU-s per 1M deliveries
#   paced  the same subscribers, 300 events at 30/s → latency p99, CPU-s per 1M deliveries
#   loaded the same subscribers, 1,500 events at 150/s (150,000 deliveries/s, within what
#          each server sustains) → latency p99, CPU-s per 1M deliveries
#
# Paced events carry the time they were due, not the time they were sent, so a server that
# holds the publisher back is charged for it. A burst's latency is from each call's start:
# a server that answers a call only once the event is written (Soketi) holds the next
# calls back, and that wait is not in its figure, while one that answers at once (Parlor)
# lets the load generator's own backlog into its figure when it is the slower side.
#
# Every scenario runs RETRIES times per server; the table (Markdown, from
# `parlor-bench summarize --median`) has each figure's median, with Parlor, Soketi and
# Sockudo columns and the ratios Parlor ÷ Soketi and Parlor ÷ Sockudo. After it, a check
# of every run: deliveries received / expected, API refusals, disconnections.
#
# Usage:  bash bench/pusher.sh            (full sizes)
#         QUICK=1 bash bench/pusher.sh    (small sizes, a smoke test)
# Tunables (environment): IDLE_CONNS IDLE_CHANNELS IDLE_PROCS FANOUT_SUBS FANOUT_MSGS WINDOW
#   PACED_RATE PACED_MSGS LOADED_RATE LOADED_MSGS RETRIES (3) PARLOR_PORT (16003) SOKETI_PORT (16001) SOCKUDO_PORT
#   (16002) SOKETI_AUX_PORT (16004: Soketi's usage/metrics listener; its cluster discovery
#   gets the next port) SOCKUDO_METRICS_PORT (16006) APP_SECRET SERVER_BIN PEERS
#   (/work/peers) SOKETI_CMD SOCKUDO_CMD (the command that starts the peer; it is run with
#   `bash -c "exec …"` and may use $SOKETI_CONFIG / $SOCKUDO_CONFIG, the config files this
#   script writes) SKIP_PARLOR=1 SKIP_SOKETI=1 SKIP_SOCKUDO=1 SKIP_BUILD=1 BENCH_OUT=DIR
#   MACHINE="..." CARGO_TARGET_DIR (where the binaries are built and looked up).
# None of these starts with PARLOR_, which is the server's configuration prefix.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SERVER_BIN=${SERVER_BIN:-$TARGET_DIR/release/parlor}
BENCH_BIN=$TARGET_DIR/release/parlor-bench
PEERS=${PEERS:-/work/peers}

PARLOR_PORT=${PARLOR_PORT:-16003}
SOKETI_PORT=${SOKETI_PORT:-16001}
SOCKUDO_PORT=${SOCKUDO_PORT:-16002}
SOKETI_AUX_PORT=${SOKETI_AUX_PORT:-16004}
SOCKUDO_METRICS_PORT=${SOCKUDO_METRICS_PORT:-16006}
DB_FILE=${DB_FILE:-/tmp/parlor-pusher-bench.db}
MACHINE=${MACHINE:-2-core rust-svc VM}
OUT=${BENCH_OUT:-/tmp/parlor-pusher-bench-$(date -u +%Y%m%dT%H%M%SZ)}

APP_ID=bench
APP_KEY=bench-key
# Parlor wants a Pusher secret of at least 16 bytes; every server gets this one.
APP_SECRET=${APP_SECRET:-bench-secret-0123456789}

if [[ -n "${QUICK:-}" ]]; then
  : "${IDLE_CONNS:=2000}" "${IDLE_CHANNELS:=20}" "${FANOUT_SUBS:=200}" "${FANOUT_MSGS:=200}"
  : "${PACED_MSGS:=60}" "${LOADED_MSGS:=300}"
fi
IDLE_CONNS=${IDLE_CONNS:-19000}
IDLE_CHANNELS=${IDLE_CHANNELS:-190}
IDLE_PROCS=${IDLE_PROCS:-2}
FANOUT_SUBS=${FANOUT_SUBS:-1000}
FANOUT_MSGS=${FANOUT_MSGS:-1000}
WINDOW=${WINDOW:-8}
PACED_RATE=${PACED_RATE:-30}
PACED_MSGS=${PACED_MSGS:-300}
LOADED_RATE=${LOADED_RATE:-150}
LOADED_MSGS=${LOADED_MSGS:-1500}
RETRIES=${RETRIES:-3}

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'pusher.sh: %s\n' "$*" >&2; exit 1; }

for tool in taskset timeout; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
[[ $(nproc) -ge 2 ]] || die "needs at least 2 CPUs (server on CPU 0, load on CPU 1)"

mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

# --- build -----------------------------------------------------------------
if [[ -z "${SKIP_BUILD:-}" ]]; then
  log "building release binaries into $TARGET_DIR"
  (cd "$ROOT" && cargo build --release --locked --workspace)
fi
[[ -x "$BENCH_BIN" ]] || die "no benchmark binary at $BENCH_BIN"

# --- the servers' configurations ---------------------------------------------
# Parlor: one domain with the Pusher app; the limits are set in start_parlor.
PARLOR_CONFIG=$OUT/parlor.toml
cat >"$PARLOR_CONFIG" <<TOML
[[domains]]
id = "bench"
name = "Pusher benchmark"
allowed_origins = ["*"]
pusher_keys = [{ app_id = "$APP_ID", key = "$APP_KEY", secret = "$APP_SECRET" }]
[domains.bot]
enabled = false
[domains.handoff]
enabled = false
TOML

# Soketi 1.6: one app, no limits (-1), in-memory everything; its usage/metrics listener
# and its cluster discovery (UDP) on ports of ours.
export SOKETI_CONFIG=$OUT/soketi.json
cat >"$SOKETI_CONFIG" <<JSON
{
  "debug": false,
  "host": "127.0.0.1",
  "port": $SOKETI_PORT,
  "metrics.enabled": false,
  "metrics.host": "127.0.0.1",
  "metrics.port": $SOKETI_AUX_PORT,
  "cluster.hostname": "127.0.0.1",
  "cluster.port": $((SOKETI_AUX_PORT + 1)),
  "adapter.driver": "local",
  "cache.driver": "memory",
  "queue.driver": "sync",
  "rateLimiter.driver": "local",
  "appManager.driver": "array",
  "appManager.array.apps": [
    {
      "id": "$APP_ID",
      "key": "$APP_KEY",
      "secret": "$APP_SECRET",
      "enabled": true,
      "max_connections": -1,
      "enable_client_messages": true,
      "max_backend_events_per_sec": -1,
      "max_client_events_per_sec": -1,
      "max_read_req_per_sec": -1,
      "webhooks": []
    }
  ]
}
JSON

# Sockudo 5.2: one app, no limits (0), no rate limiter (on by default: 100 API requests a
# minute per address), everything in memory, no metrics.
export SOCKUDO_CONFIG=$OUT/sockudo.toml
cat >"$SOCKUDO_CONFIG" <<TOML
debug = false
host = "127.0.0.1"
port = $SOCKUDO_PORT
mode = "production"
path_prefix = "/"
max_connections = 0
shutdown_grace_period = 2

[adapter]
driver = "local"

[cache]
driver = "memory"

[queue]
driver = "memory"

[app_manager]
driver = "memory"

[app_manager.cache]
enabled = false

[[app_manager.array.apps]]
id = "$APP_ID"
key = "$APP_KEY"
secret = "$APP_SECRET"
enabled = true

[app_manager.array.apps.policy.limits]
max_connections = 0
max_client_events_per_second = 0
max_backend_events_per_second = 1000000
max_read_requests_per_second = 1000000

[app_manager.array.apps.policy.features]
enable_client_messages = true
enable_user_authentication = false

[rate_limiter]
enabled = false
driver = "memory"

[metrics]
enabled = false
host = "127.0.0.1"
port = $SOCKUDO_METRICS_PORT
TOML

# Which servers run: Parlor, and each peer unless skipped or not installed (then say so).
SERVERS=()
[[ -z "${SKIP_PARLOR:-}" ]] && SERVERS+=(parlor)
SOKETI_JS=$PEERS/soketi/node_modules/@soketi/soketi/bin/server.js
if [[ -z "${SKIP_SOKETI:-}" ]]; then
  if [[ -n "${SOKETI_CMD:-}" || -f $SOKETI_JS ]]; then
    SERVERS+=(soketi)
  else
    echo "pusher.sh: no Soketi at $SOKETI_JS (set SOKETI_CMD, or SKIP_SOKETI=1)" >&2
  fi
fi
if [[ -z "${SKIP_SOCKUDO:-}" ]]; then
  if [[ -n "${SOCKUDO_CMD:-}" || -x $PEERS/sockudo/bin/sockudo ]]; then
    SERVERS+=(sockudo)
  else
    echo "pusher.sh: no Sockudo at $PEERS/sockudo/bin/sockudo (set SOCKUDO_CMD, or SKIP_SOCKUDO=1)" >&2
  fi
fi
SOKETI_CMD=${SOKETI_CMD:-node $SOKETI_JS start --config=\$SOKETI_CONFIG}
SOCKUDO_CMD=${SOCKUDO_CMD:-$PEERS/sockudo/bin/sockudo --config \$SOCKUDO_CONFIG}
((${#SERVERS[@]})) || die "no server to run"
if [[ " ${SERVERS[*]} " == *" parlor "* ]]; then
  [[ -x "$SERVER_BIN" ]] || die "no server binary at $SERVER_BIN"
fi

# Up to ~19,000 sockets per process: raise the soft descriptor limit (the servers inherit it).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

read -r load1 _ </proc/loadavg
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
  printf 'warning: load average is %s; other processes will skew the figures\n' "$load1" >&2
fi

# --- server lifecycle ------------------------------------------------------
BENCH_PID=

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# The process that does the work: the started one, or, while that is a wrapper (a shell,
# npm, env) with a single child, that child. For Soketi this is the node process.
worker_pid() {
  local pid=$1 comm kids
  for _ in 1 2 3 4; do
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    case $comm in
      sh | bash | dash | npm | npx | env | taskset | timeout) ;;
      *) break ;;
    esac
    kids=$(cat /proc/"$pid"/task/*/children 2>/dev/null | xargs || true)
    [[ -n $kids && $(wc -w <<<"$kids") -eq 1 ]] || break
    pid=$kids
  done
  echo "$pid"
}

# wait_for_port, stop_server
source "$ROOT/bench/lib.sh"
stop_bench() {
  stop_server
  BENCH_PID=
}
trap stop_bench EXIT
trap 'exit 130' INT TERM

# The high limits bench/run.sh gives Parlor, and the HTTP API's own (this scenario's
# publisher is one address and one identity).
start_parlor() {
  port_free "$PARLOR_PORT" || die "port $PARLOR_PORT is taken"
  rm -f "$DB_FILE" "$DB_FILE-wal" "$DB_FILE-shm"
  PARLOR_LIMITS__MESSAGES_PER_SECOND=1000000 \
  PARLOR_LIMITS__MESSAGES_BURST=1000000 \
  PARLOR_LIMITS__MAX_CONNECTIONS=50000 \
  PARLOR_LIMITS__IP_CONNECTS_PER_SECOND=1000000 \
  PARLOR_LIMITS__IP_CONNECTS_BURST=1000000 \
  PARLOR_LIMITS__IP_MAX_CONNECTIONS=0 \
  PARLOR_LIMITS__IP_MAX_WEBSOCKETS=0 \
  PARLOR_LIMITS__IP_REQUESTS_PER_SECOND=1000000 \
  PARLOR_LIMITS__IP_REQUESTS_BURST=1000000 \
  PARLOR_LIMITS__IDENTITY_REQUESTS_PER_SECOND=1000000 \
  PARLOR_LIMITS__IDENTITY_REQUESTS_BURST=1000000 \
    taskset -c 0 "$SERVER_BIN" serve --listen "127.0.0.1:$PARLOR_PORT" \
      --config "$PARLOR_CONFIG" --database "sqlite://$DB_FILE" >>"$OUT/parlor.log" 2>&1 &
  SERVER_PID=$!
  wait_for_port "$PARLOR_PORT" "$SERVER_PID" parlor
  URL=ws://127.0.0.1:$PARLOR_PORT
  BENCH_PID=$SERVER_PID
}

start_soketi() {
  port_free "$SOKETI_PORT" || die "port $SOKETI_PORT is taken (another Soketi running?)"
  taskset -c 0 bash -c "exec $SOKETI_CMD" >>"$OUT/soketi.log" 2>&1 &
  SERVER_PID=$!
  wait_for_port "$SOKETI_PORT" "$SERVER_PID" soketi
  URL=ws://127.0.0.1:$SOKETI_PORT
  BENCH_PID=$(worker_pid "$SERVER_PID")
}

start_sockudo() {
  port_free "$SOCKUDO_PORT" || die "port $SOCKUDO_PORT is taken (another Sockudo running?)"
  # Sockudo also reads config/config.toml relative to its directory: run it where there is none.
  taskset -c 0 bash -c "cd '$OUT' && exec $SOCKUDO_CMD" >>"$OUT/sockudo.log" 2>&1 &
  SERVER_PID=$!
  wait_for_port "$SOCKUDO_PORT" "$SERVER_PID" sockudo
  URL=ws://127.0.0.1:$SOCKUDO_PORT
  BENCH_PID=$(worker_pid "$SERVER_PID")
}

FAILED=()

# scenario SERVER LIMIT_SECS ARGS... — RETRIES runs of `parlor-bench pusher ARGS` against
# a fresh SERVER each, pinned to CPU 1, each bounded by LIMIT_SECS; the JSON lines go to
# the results. A failure is reported and the suite goes on.
scenario() {
  local server=$1 limit=$2 attempt line comm
  shift 2
  for attempt in $(seq 1 "$RETRIES"); do
    "start_$server"
    comm=$(cat "/proc/$BENCH_PID/comm" 2>/dev/null || echo '?')
    log "$server (pid $BENCH_PID, $comm): parlor-bench pusher $* (run $attempt/$RETRIES)"
    if ! line=$(timeout --kill-after=15 "$limit" taskset -c 1 "$BENCH_BIN" pusher "$@" \
        --pid "$BENCH_PID" --url "$URL" --label "$server" --app-id "$APP_ID" \
        --key "$APP_KEY" --secret "$APP_SECRET" --json \
        2> >(tee -a "$OUT/bench.log" >&2)); then
      echo "pusher.sh: '$server $1' failed or timed out (limit ${limit}s)" >&2
      if ! kill -0 "$BENCH_PID" 2>/dev/null; then
        echo "pusher.sh: the $server server died during '$1'" >&2
      fi
      FAILED+=("$server $* (run $attempt)")
      stop_bench
      continue
    fi
    stop_bench
    printf '%s\n' "$line" >>"$RESULTS"
  done
}

for server in "${SERVERS[@]}"; do
  scenario "$server" 900 idle --conns "$IDLE_CONNS" --channels "$IDLE_CHANNELS" \
    --procs "$IDLE_PROCS"
  scenario "$server" 600 fanout --subs "$FANOUT_SUBS" --messages "$FANOUT_MSGS" \
    --mode burst --window "$WINDOW"
  scenario "$server" 600 fanout --subs "$FANOUT_SUBS" --messages "$PACED_MSGS" \
    --mode paced --rate "$PACED_RATE"
  scenario "$server" 600 fanout --subs "$FANOUT_SUBS" --messages "$LOADED_MSGS" \
    --mode paced --rate "$LOADED_RATE"
done

# --- summary ---------------------------------------------------------------
log "summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $MACHINE, median of $RETRIES runs); raw lines in $RESULTS"
"$BENCH_BIN" summarize --median --date "$(date -u +%Y-%m-%d)" --machine "$MACHINE" \
  --baseline soketi=Soketi --baseline sockudo=Sockudo "$RESULTS" | tee "$OUT/summary.md"

# Every run's completeness: a figure from a run that lost deliveries, was refused by the
# API or disconnected is not comparable.
{
  printf '\nruns:\n'
  jq -r '
    if .scenario == "pusher-fanout" then
      "- \(.label) \(.mode): \(.deliveries)/\(.expected_deliveries) deliveries"
      + " (missing \(.missing), duplicate \(.duplicates)); API \(.publisher.accepted)/\(.publisher.sent) accepted"
      + (if .publisher.failures.total > 0 then ", refused/failed: \(.publisher.failures.by_message)" else "" end)
      + (if .disconnected.total > 0 then "; disconnected: \(.disconnected.by_message)" else "" end)
      + (if .server_errors.total > 0 then "; pusher:error: \(.server_errors.by_message)" else "" end)
      + (if .client_saturated then "; load generator CPU-bound" else "" end)
      + (if .machine_quiet | not then "; machine busy (\(.other_cpu_seconds) CPU-s)" else "" end)
      + "; \(.deliveries_per_second | floor)/s, p50 \(.latency.p50_ms) ms, p99 \(.latency.p99_ms) ms, server \(.server_cpu_seconds) CPU-s"
    else
      "- \(.label) idle: \(.joined)/\(.conns) subscribed"
      + (if .failed.total > 0 then " (failed: \(.failed.by_message))" else "" end)
      + ", \(.dropped_while_idle) dropped while idle, RSS \(.rss_before_kib) → \(.rss_after_kib) KiB"
      + " (\(.rss_per_conn_kib * 100 | round / 100) KiB/conn)"
    end' "$RESULTS" 2>/dev/null || echo "(jq is needed for the per-run lines)"
} | tee -a "$OUT/summary.md"
if ((${#FAILED[@]})); then
  printf '\nfailed runs:\n' >&2
  printf '  %s\n' "${FAILED[@]}" >&2
  exit 1
fi
