#!/usr/bin/env bash
# bench/run.sh — the Parlor benchmark suite (see BENCHMARKS.md, "Method").
#
# Builds the release binaries, then for each scenario starts a fresh server
# pinned to CPU 0 (Parlor, then the Node.js baselines: uWebSockets.js in
# bench/node/uws.js and `ws` in bench/node/broadcast.js) and runs parlor-bench
# pinned to CPU 1 against it:
#
#   idle     19,000 joined idle connections over 190 rooms → server RSS/conn
#   fanout   1,000 subscribers × 1,000 messages, burst      → deliveries/s, latency, CPU
#   fanout   1,000 subscribers, paced at 30 msgs/s          → latency under steady load
#   persist  100 senders × 200 messages, window 1 (the Node baselines keep nothing)
#   jetstream the same workload published to a NATS JetStream stream with file
#            storage on the machine's NATS server (NATS_URL), pinned to CPU 0
#            meanwhile (its previous CPU mask is restored afterwards)
#   persist  on PostgreSQL, when DATABASE_URL is set: the same workload, one node
#            storing in a fresh database created on that server (dropped after);
#            PostgreSQL runs where the system puts it
#   ai-stream 1,000 concurrent streamed AI replies from a fake vendor, direct and
#            through Parlor → time to first token added, server CPU per stream
#   sessions 5,000 guided sessions (/chat) answering every 2 s, with the built-in guide
#            and with a fake AI service → answer latency, CPU per 1,000 answers, RSS/session
#            (Parlor only)
#
# and prints a Markdown table of the figures: Parlor, uWS, ws and JetStream
# columns and the ratios Parlor ÷ uWS, Parlor ÷ ws and Parlor ÷ JetStream.
#
# Usage:  bash bench/run.sh            (full run, ~5 minutes plus the build)
#         QUICK=1 bash bench/run.sh    (small sizes, a smoke test)
# Tunables (environment): IDLE_CONNS IDLE_ROOMS IDLE_PROCS FANOUT_SUBS FANOUT_MSGS
#   PACED_RATE PACED_MSGS PERSIST_SENDERS PERSIST_MSGS PERSIST_WINDOW AI_STREAMS
#   SESSIONS SESSION_PACE_MS SESSION_ANSWERS FAKE_PORT BENCH_JWT_SECRET RETRIES (3)
#   SERVER_PORT NODE_PORT UWS_PORT NATS_URL (nats://127.0.0.1:4222) NATS_PID (default:
#   pgrep -x nats-server) NATS_PIN=0 (leave the NATS server's CPU mask alone) SERVER_BIN
#   SKIP_BUILD=1 SKIP_NODE=1 (both Node baselines) SKIP_UWS=1 (uWS only)
#   SKIP_JETSTREAM=1 BENCH_OUT=DIR MACHINE="..." DATABASE_URL (postgres://…, optional)
#   CARGO_TARGET_DIR (where the binaries are built and looked up).
# None of these starts with PARLOR_, which is the server's configuration prefix.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SERVER_BIN=${SERVER_BIN:-$TARGET_DIR/release/parlor}
BENCH_BIN=$TARGET_DIR/release/parlor-bench
NODE_DIR=$ROOT/bench/node

SERVER_PORT=${SERVER_PORT:-18080}
NODE_PORT=${NODE_PORT:-18081}
UWS_PORT=${UWS_PORT:-18082}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
DB_FILE=${DB_FILE:-/tmp/parlor-bench.db}
MACHINE=${MACHINE:-2-core rust-svc VM}
OUT=${BENCH_OUT:-/tmp/parlor-bench-$(date -u +%Y%m%dT%H%M%SZ)}

if [[ -n "${QUICK:-}" ]]; then
  : "${IDLE_CONNS:=2000}" "${IDLE_ROOMS:=20}" "${FANOUT_SUBS:=200}" "${FANOUT_MSGS:=200}"
  : "${PACED_RATE:=30}" "${PACED_MSGS:=60}" "${PERSIST_SENDERS:=20}" "${PERSIST_MSGS:=50}"
  : "${AI_STREAMS:=100}" "${SESSIONS:=500}"
fi
IDLE_CONNS=${IDLE_CONNS:-19000}
IDLE_ROOMS=${IDLE_ROOMS:-190}
IDLE_PROCS=${IDLE_PROCS:-2}
FANOUT_SUBS=${FANOUT_SUBS:-1000}
FANOUT_MSGS=${FANOUT_MSGS:-1000}
PACED_RATE=${PACED_RATE:-30}
PACED_MSGS=${PACED_MSGS:-300}
PERSIST_SENDERS=${PERSIST_SENDERS:-100}
PERSIST_MSGS=${PERSIST_MSGS:-200}
PERSIST_WINDOW=${PERSIST_WINDOW:-1}
AI_STREAMS=${AI_STREAMS:-1000}
SESSIONS=${SESSIONS:-5000}
SESSION_PACE_MS=${SESSION_PACE_MS:-2000}
SESSION_ANSWERS=${SESSION_ANSWERS:-6}
# The server's auth.jwt_secret, with which the sessions scenario signs its users' tokens.
BENCH_JWT_SECRET=${BENCH_JWT_SECRET:-parlor-bench-jwt-secret-0123456789}
RETRIES=${RETRIES:-3}

log() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

for tool in taskset timeout; do
  command -v "$tool" >/dev/null || die "$tool is required"
done
[[ -n "${SKIP_BUILD:-}" ]] || command -v cargo >/dev/null || die "cargo is required (or SKIP_BUILD=1)"
if [[ -z "${SKIP_NODE:-}" ]]; then
  command -v node >/dev/null || die "node is required for the baseline (or set SKIP_NODE=1)"
  command -v npm >/dev/null || die "npm is required for the baseline (or set SKIP_NODE=1)"
fi
[[ $(nproc) -ge 2 ]] || die "needs at least 2 CPUs (server on CPU 0, load on CPU 1)"

mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

# --- build -----------------------------------------------------------------
if [[ -z "${SKIP_BUILD:-}" ]]; then
  log "building release binaries into $TARGET_DIR"
  (cd "$ROOT" && cargo build --release -p parlor -p parlor-bench)
fi
[[ -x "$SERVER_BIN" ]] || die "no server binary at $SERVER_BIN"
[[ -x "$BENCH_BIN" ]] || die "no benchmark binary at $BENCH_BIN"
if [[ -z "${SKIP_NODE:-}" ]] && [[ ! -d "$NODE_DIR/node_modules/ws" ||
    ( -z "${SKIP_UWS:-}" && ! -d "$NODE_DIR/node_modules/@trufflesuite/uws-js-unofficial" ) ]]; then
  log "installing the Node baselines' dependencies"
  (cd "$NODE_DIR" && npm install --no-audit --no-fund)
fi

# The JetStream baseline runs on the machine's NATS server: check it answers.
NATS_HOSTPORT=${NATS_URL#nats://}
NATS_HOSTPORT=${NATS_HOSTPORT%%/*}
[[ $NATS_HOSTPORT == *:* ]] || NATS_HOSTPORT=$NATS_HOSTPORT:4222
if [[ -z "${SKIP_JETSTREAM:-}" ]]; then
  if ! (exec 3<>"/dev/tcp/${NATS_HOSTPORT%:*}/${NATS_HOSTPORT##*:}") 2>/dev/null; then
    die "no NATS server answers at $NATS_URL (start one with JetStream, or SKIP_JETSTREAM=1)"
  fi
  if [[ -z "${NATS_PID:-}" ]]; then
    NATS_PID=$(pgrep -x nats-server || true)
    if [[ $(wc -w <<<"$NATS_PID") -ne 1 ]]; then
      printf 'warning: %s nats-server processes; set NATS_PID for its CPU figures\n' \
        "$(wc -w <<<"$NATS_PID")" >&2
      NATS_PID=
    fi
  fi
fi

# Up to ~19,000 sockets per process: raise the soft descriptor limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt $((IDLE_CONNS / IDLE_PROCS + 200)) ]]; then
  printf 'warning: ulimit -n is %s; %s connections per process may not fit\n' \
    "$(ulimit -n)" "$((IDLE_CONNS / IDLE_PROCS))" >&2
fi

# Figures from a busy machine are not comparable: say so.
read -r load1 _ </proc/loadavg
if awk -v l="$load1" 'BEGIN { exit !(l > 0.5) }'; then
  printf 'warning: load average is %s; other processes will skew the figures\n' "$load1" >&2
fi

# --- server lifecycle ------------------------------------------------------
# wait_for_port, stop_server
source "$ROOT/bench/lib.sh"

# The NATS server is the machine's, not ours: the jetstream scenario only pins it
# to CPU 0 while it runs, and this puts its previous CPU mask back.
NATS_MASK=
restore_nats() {
  if [[ -n "$NATS_MASK" ]]; then
    if taskset -a -p "$NATS_MASK" "$NATS_PID" >/dev/null 2>&1; then
      echo "run.sh: nats-server $NATS_PID's CPU mask $NATS_MASK restored" >&2
    else
      echo "run.sh: could not restore nats-server $NATS_PID's CPU mask $NATS_MASK" >&2
    fi
    NATS_MASK=
  fi
}
# The PostgreSQL persist run's database, created fresh on DATABASE_URL's server.
PG_DB=
drop_pg_db() {
  if [[ -n "$PG_DB" ]]; then
    psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null || true
    PG_DB=
  fi
}
cleanup() {
  stop_server
  restore_nats
  drop_pg_db
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_parlor() {
  stop_server
  rm -f "$DB_FILE" "$DB_FILE-wal" "$DB_FILE-shm"
  local database=sqlite://$DB_FILE
  if [[ -n "${STORE_URL:-}" ]]; then
    database=$STORE_URL
  fi
  PARLOR_LIMITS__MESSAGES_PER_SECOND=1000000 \
  PARLOR_LIMITS__MESSAGES_BURST=1000000 \
  PARLOR_LIMITS__MAX_CONNECTIONS=50000 \
  PARLOR_LIMITS__IP_CONNECTS_PER_SECOND=1000000 \
  PARLOR_LIMITS__IP_CONNECTS_BURST=1000000 \
  PARLOR_LIMITS__IP_MAX_CONNECTIONS=0 \
  PARLOR_LIMITS__IP_MAX_WEBSOCKETS=0 \
  PARLOR_LIMITS__IP_AI_REQUESTS_PER_MINUTE=1000000 \
  PARLOR_LIMITS__IP_AI_TOKENS_PER_MINUTE=1000000000 \
  PARLOR_LIMITS__AI_CALLS_PER_DOMAIN=100000 \
  PARLOR_AUTH__JWT_SECRET=$BENCH_JWT_SECRET \
    taskset -c 0 "$SERVER_BIN" serve --listen "127.0.0.1:$SERVER_PORT" \
      --config "$SERVER_CONFIG" --database "$database" >>"$OUT/parlor.log" 2>&1 &
  SERVER_PID=$!
  wait_for_port "$SERVER_PORT" "$SERVER_PID" parlor
  URL=ws://127.0.0.1:$SERVER_PORT$WS_PATH
  LABEL=parlor
  BENCH_PID=$SERVER_PID
}

start_node() {
  stop_server
  PORT=$NODE_PORT HOST=127.0.0.1 taskset -c 0 node "$NODE_DIR/broadcast.js" >>"$OUT/node.log" 2>&1 &
  SERVER_PID=$!
  wait_for_port "$NODE_PORT" "$SERVER_PID" node
  URL=ws://127.0.0.1:$NODE_PORT/ws
  LABEL=node
  BENCH_PID=$SERVER_PID
}

start_uws() {
  stop_server
  PORT=$UWS_PORT HOST=127.0.0.1 taskset -c 0 node "$NODE_DIR/uws.js" >>"$OUT/uws.log" 2>&1 &
  SERVER_PID=$!
  wait_for_port "$UWS_PORT" "$SERVER_PID" uws
  URL=ws://127.0.0.1:$UWS_PORT/ws
  LABEL=uws
  BENCH_PID=$SERVER_PID
}

# Nothing to start: the machine's NATS server keeps running. Pinned to CPU 0 for
# the run, as the other servers are (unless NATS_PIN=0).
start_nats() {
  stop_server
  URL=$NATS_URL
  LABEL=jetstream
  BENCH_PID=$NATS_PID
  if [[ -n "$NATS_PID" && -z "$NATS_MASK" && ${NATS_PIN:-1} != 0 ]]; then
    local mask
    mask=$(taskset -p "$NATS_PID" 2>/dev/null | awk '{ print $NF }')
    if [[ -n "$mask" ]] && taskset -a -p -c 0 "$NATS_PID" >/dev/null 2>&1; then
      NATS_MASK=$mask
      echo "run.sh: nats-server $NATS_PID pinned to CPU 0 (mask $mask until the run ends)" >&2
    else
      echo "run.sh: could not pin nats-server $NATS_PID to CPU 0; it runs unpinned" >&2
    fi
  fi
}

# The chat scenarios run without the demo's assistant (it would answer every message) and
# without hand-off (a visitor's first message in a domain with no assistant queues the room
# for a person, which writes a status message the persist check would count); the AI
# scenario points the assistant at the fake vendor parlor-bench runs on $FAKE_PORT.
FAKE_PORT=${FAKE_PORT:-18090}
cat >"$OUT/chat.toml" <<'TOML'
[[domains]]
id = "demo"
name = "Parlor demo"
visitor_rooms = "open"
allowed_origins = ["*"]
[domains.bot]
enabled = false
[domains.handoff]
enabled = false
TOML
cat >"$OUT/ai.toml" <<TOML
[ai.providers.fake]
kind = "openai"
base_url = "http://127.0.0.1:$FAKE_PORT/v1"
model = "fake-model"
retries = 0
[[domains]]
id = "demo"
name = "Parlor demo"
visitor_rooms = "open"
allowed_origins = ["*"]
[domains.bot]
providers = ["fake"]
knowledge_dir = "builtin:demo"
TOML
# The sessions scenario's service mode: the demo domain's guided sessions ask the fake AI
# service parlor-bench runs on $FAKE_PORT (its templates stay the built-in mutual-nda).
cat >"$OUT/sessions.toml" <<TOML
[[domains]]
id = "demo"
name = "Demo"
visitor_rooms = "open"
allowed_origins = ["*"]
ai_service_url = "http://127.0.0.1:$FAKE_PORT"
ai_service_api_key = "bench"
TOML
SERVER_CONFIG=$OUT/chat.toml
WS_PATH=/ws
BENCH_PID=

FAILED=()

# scenario SERVER LIMIT_SECS SUBCOMMAND ARGS... — starts a fresh SERVER
# (parlor, uws or node; nats uses the machine's NATS server), runs one
# parlor-bench subcommand against it pinned to CPU 1, bounded by LIMIT_SECS,
# and appends its JSON line to the results. A run that reports other
# processes busy meanwhile ("machine_quiet":false) is repeated, up to RETRIES
# times in all; a failure is reported and the suite goes on.
scenario() {
  local server=$1 limit=$2 attempt=1 line
  local -a pid_arg
  shift 2
  while :; do
    "start_$server"
    pid_arg=()
    [[ -n "$BENCH_PID" ]] && pid_arg=(--pid "$BENCH_PID")
    log "$LABEL: parlor-bench $* (attempt $attempt)"
    if ! line=$(timeout --kill-after=15 "$limit" taskset -c 1 "$BENCH_BIN" "$@" \
        "${pid_arg[@]}" --url "$URL" --label "$LABEL" --json \
        2> >(tee -a "$OUT/bench.log" >&2)); then
      echo "run.sh: '$LABEL $1' failed or timed out (limit ${limit}s)" >&2
      if [[ -n "$BENCH_PID" ]] && ! kill -0 "$BENCH_PID" 2>/dev/null; then
        echo "run.sh: the $LABEL server died during '$1'" >&2
      fi
      FAILED+=("$LABEL $*")
      stop_server
      return 0
    fi
    stop_server
    if [[ $line == *'"machine_quiet":false'* ]] && ((attempt < RETRIES)); then
      echo "run.sh: other processes were busy during '$LABEL $1'; retrying in 15 s" >&2
      attempt=$((attempt + 1))
      sleep 15
      continue
    fi
    printf '%s\n' "$line" >>"$RESULTS"
    return 0
  done
}

# Each run gets a fresh server so that none measures another's leftovers.
SERVERS=(parlor)
[[ -z "${SKIP_NODE:-}" && -z "${SKIP_UWS:-}" ]] && SERVERS+=(uws)
[[ -z "${SKIP_NODE:-}" ]] && SERVERS+=(node)

for server in "${SERVERS[@]}"; do
  scenario "$server" 900 idle --conns "$IDLE_CONNS" --rooms "$IDLE_ROOMS" --procs "$IDLE_PROCS"
done
for server in "${SERVERS[@]}"; do
  scenario "$server" 600 fanout --subs "$FANOUT_SUBS" --messages "$FANOUT_MSGS" --mode burst
done
for server in "${SERVERS[@]}"; do
  scenario "$server" 600 fanout --subs "$FANOUT_SUBS" --messages "$PACED_MSGS" \
    --mode paced --rate "$PACED_RATE"
done
scenario parlor 600 persist --senders "$PERSIST_SENDERS" --messages "$PERSIST_MSGS" \
  --window "$PERSIST_WINDOW"
if [[ -n "${DATABASE_URL:-}" ]]; then
  # A fresh database, so that the run measures an empty store as the SQLite one does.
  PG_DB=parlor_bench_$(date -u +%s)
  psql -q "$DATABASE_URL" -c "CREATE DATABASE $PG_DB" >/dev/null
  STORE_URL="${DATABASE_URL%/*}/$PG_DB"
  scenario parlor 600 persist --senders "$PERSIST_SENDERS" --messages "$PERSIST_MSGS" \
    --window "$PERSIST_WINDOW" --database PostgreSQL
  STORE_URL=
  drop_pg_db
fi
if [[ -z "${SKIP_JETSTREAM:-}" ]]; then
  scenario nats 600 jetstream --senders "$PERSIST_SENDERS" --messages "$PERSIST_MSGS" \
    --window "$PERSIST_WINDOW"
  restore_nats
fi
SERVER_CONFIG=$OUT/ai.toml
scenario parlor 600 ai-stream --streams "$AI_STREAMS" --fake-port "$FAKE_PORT"
SERVER_CONFIG=$OUT/chat.toml
# Guided sessions on /chat: the built-in guide (offline: chat.toml's demo has no
# assistant), then the fake AI service.
WS_PATH=/chat
scenario parlor 600 sessions --mode guide --sessions "$SESSIONS" \
  --pace-ms "$SESSION_PACE_MS" --answers "$SESSION_ANSWERS" --jwt-secret "$BENCH_JWT_SECRET"
SERVER_CONFIG=$OUT/sessions.toml
scenario parlor 600 sessions --mode service --sessions "$SESSIONS" \
  --pace-ms "$SESSION_PACE_MS" --answers "$SESSION_ANSWERS" --jwt-secret "$BENCH_JWT_SECRET" \
  --fake-port "$FAKE_PORT"
SERVER_CONFIG=$OUT/chat.toml
WS_PATH=/ws

# --- summary ---------------------------------------------------------------
log "summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $MACHINE); raw lines in $RESULTS"
"$BENCH_BIN" summarize --targets --date "$(date -u +%Y-%m-%d)" --machine "$MACHINE" \
  "$RESULTS" | tee "$OUT/summary.md"
if ((${#FAILED[@]})); then
  printf '\nfailed runs:\n' >&2
  printf '  %s\n' "${FAILED[@]}" >&2
  exit 1
fi
