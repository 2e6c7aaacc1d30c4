#!/usr/bin/env bash
# Run the Autobahn|Testsuite fuzzingclient (cases 1.* - 10.*, no 12.*/13.*
# compression cases) against a running WebSocket echo server.
#
#   tests/autobahn/run.sh [ws://127.0.0.1:9001]
#
# The server must already be listening (tests/autobahn.rs starts the
# WebSocket layer's echo mode and runs this script against it). The suite (Python 2.7 only) is installed on first use into
# target/autobahn/py from tests/autobahn/requirements.txt (pinned, hashed);
# later runs reuse it. The HTML/JSON report goes to target/autobahn/report.
#
# Exit status: 0 all cases passed; 1 a case failed or is missing from the
# report; 2 setup error (install failed, server not reachable, wstest crashed
# or timed out); 3 no Python 2.7 interpreter on this machine.
#
# Runs are serialized with a lock on target/autobahn/lock (they share the
# install, the spec and the report directory).
#
# Environment:
#   AUTOBAHN_PYTHON   Python 2.7 interpreter (default: found under pyenv/PATH)
#   AUTOBAHN_CASES    comma-separated case patterns (default 1.*,...,10.*)
#   AUTOBAHN_TIMEOUT  seconds for the whole wstest run (default 600; the
#                     reference echo server takes ~20 s, a server that never
#                     answers costs ~5 s per case)
#   AUTOBAHN_WAIT     seconds to wait for the server port to open (default 30)
set -euo pipefail

URL="${1:-ws://127.0.0.1:9001}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
AB_DIR="$ROOT/target/autobahn"
PY_DIR="$AB_DIR/py"
REPORT_DIR="$AB_DIR/report"
SPEC="$AB_DIR/fuzzingclient.json"
CASES="${AUTOBAHN_CASES:-1.*,2.*,3.*,4.*,5.*,6.*,7.*,8.*,9.*,10.*}"

die() { echo "autobahn: $*" >&2; exit 2; }

# --- find Python 2.7 --------------------------------------------------------
is_py27() { "$1" -S -c 'import sys; sys.exit(sys.version_info[:2] != (2, 7))' >/dev/null 2>&1; }
PY=""
if [ -n "${AUTOBAHN_PYTHON:-}" ]; then
  cands=("$AUTOBAHN_PYTHON")
else
  cands=("${PYENV_ROOT:-$HOME/.pyenv}"/versions/2.7*/bin/python2.7 python2.7 python2)
fi
for cand in "${cands[@]}"; do
  if is_py27 "$cand"; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then
  echo "autobahn: no working Python 2.7 found (set AUTOBAHN_PYTHON); note the pyenv shim 'python2.7' fails unless 2.7 is selected" >&2
  exit 3
fi

mkdir -p "$AB_DIR"
exec 9>"$AB_DIR/lock"
flock 9

# --- install (idempotent) ---------------------------------------------------
# The stamp covers the pin files and the interpreter, so changing either
# reinstalls. Install into a temp dir and rename, so an interrupted install
# never looks complete.
STAMP="$(cat "$HERE/requirements.txt" "$HERE/build-constraints.txt" | sha256sum | cut -c1-16) $("$PY" -S -c 'import sys; print(sys.executable)')"
if [ "$(cat "$PY_DIR/.installed" 2>/dev/null || true)" != "$STAMP" ]; then
  echo "autobahn: installing wstest into $PY_DIR (python: $PY)"
  TMP="$AB_DIR/py.tmp.$$"
  rm -rf "$TMP"
  start=$SECONDS
  # pip 19.2.3 ships with pyenv's 2.7.18 and is fine; PIP_CONSTRAINT pins the
  # isolated build env of wsaccel (the only PEP 517 sdist).
  if ! env PYTHONPATH= PYTHONNOUSERSITE=1 PIP_CONSTRAINT="$HERE/build-constraints.txt" \
      "$PY" -m pip install --disable-pip-version-check --no-input \
      --no-warn-script-location --no-deps --require-hashes \
      --target "$TMP" -r "$HERE/requirements.txt" >"$AB_DIR/install.log" 2>&1; then
    tail -n 40 "$AB_DIR/install.log" >&2
    rm -rf "$TMP"
    die "pip install failed (full log: $AB_DIR/install.log)"
  fi
  echo "$STAMP" >"$TMP/.installed"
  rm -rf "$PY_DIR"
  mv "$TMP" "$PY_DIR"
  echo "autobahn: installed in $((SECONDS - start))s"
fi

# Run Python with only the installed tree: -S skips the interpreter's own
# site-packages; site.addsitedir() (not PYTHONPATH) so that the zope
# namespace .pth file in the --target dir is processed.
PYRUN=(env PYTHONPATH= PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 AB_SITE="$PY_DIR" "$PY" -S -c)
BOOT='import os, site, sys; site.addsitedir(os.environ["AB_SITE"]); '

# --- wait for the server ----------------------------------------------------
hostport="${URL#*://}"; hostport="${hostport%%/*}"
host="${hostport%:*}"; port="${hostport##*:}"
[ "$port" != "$hostport" ] || port=80
host="${host#[}"; host="${host%]}"
deadline=$((SECONDS + ${AUTOBAHN_WAIT:-30}))
until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
  [ "$SECONDS" -lt "$deadline" ] || die "nothing listening at $host:$port ($URL)"
  sleep 0.2
done

# --- spec and run -----------------------------------------------------------
rm -rf "$REPORT_DIR"
mkdir -p "$REPORT_DIR"
"${PYRUN[@]}" "${BOOT}"'
import json
url, cases, outdir, spec = sys.argv[1:5]
json.dump({
    "outdir": outdir,
    "servers": [{"agent": "parlor", "url": url}],
    "cases": [c.strip() for c in cases.split(",") if c.strip()],
    "exclude-cases": ["12.*", "13.*"],
    "exclude-agent-cases": {},
}, open(spec, "w"), indent=2)
' "$URL" "$CASES" "$REPORT_DIR" "$SPEC"

echo "autobahn: wstest -m fuzzingclient -s $SPEC  (server $URL, cases $CASES)"
start=$SECONDS
rc=0
(cd "$AB_DIR" && timeout -k 10 "${AUTOBAHN_TIMEOUT:-600}" "${PYRUN[@]}" \
  "${BOOT}"'sys.argv[0] = "wstest"; from autobahntestsuite.wstest import run; sys.exit(run())' \
  -m fuzzingclient -s "$SPEC") >"$AB_DIR/wstest.log" 2>&1 || rc=$?
echo "autobahn: wstest finished in $((SECONDS - start))s (exit $rc, log $AB_DIR/wstest.log)"
if [ "$rc" -ne 0 ]; then
  tail -n 40 "$AB_DIR/wstest.log" >&2
  [ "$rc" -eq 124 ] && die "wstest timed out after ${AUTOBAHN_TIMEOUT:-600}s"
  die "wstest exited with status $rc"
fi

# --- verdict ----------------------------------------------------------------
rc=0
"${PYRUN[@]}" "${BOOT}"'sys.path.insert(0, sys.argv.pop(1)); import check_report; sys.exit(check_report.main(sys.argv))' \
  "$HERE" "$SPEC" "$REPORT_DIR" || rc=$?
exit "$rc"
