# bench/lib.sh — the server lifecycle bench/run.sh and bench/pusher.sh share. Sourced, not
# run; the sourcing script defines `die` and `OUT` (where each server's log goes) and keeps
# the started server's pid in SERVER_PID.

SERVER_PID=

# Waits up to 30 s for something to listen on 127.0.0.1:port, and dies if the process
# `pid` (named `name`) exits first.
wait_for_port() { # port pid name
  local port=$1 pid=$2 name=$3
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || die "$name exited during start-up (see $OUT/$name.log)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  die "$name did not listen on 127.0.0.1:$port within 30 s (see $OUT/$name.log)"
}

# Stops the server: SIGTERM, then SIGKILL if it is still there after 10 s.
stop_server() {
  [[ -n "$SERVER_PID" ]] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "server $SERVER_PID ignored SIGTERM for 10 s; killing it" >&2
      kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
  fi
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
