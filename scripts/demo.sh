#!/usr/bin/env bash
# Sends the two sample chat requests ("Tell me about San Francisco" and a ~1,000-token San
# Francisco passage with a question) through the proxy and prints the answers.
#
#   bash scripts/demo.sh [launcher arguments...]
#
# If a system already answers on $SPLITWISE_URL (default http://127.0.0.1:8030), the requests go
# there. Otherwise the demo starts one (`python -m splitwise_local --port PORT [arguments]`),
# waits until it is ready, sends the requests, and stops it again; its console goes to
# $SPLITWISE_DEMO_LOG (default runs/demo-TIME.log). SPLITWISE_STREAM=1 streams the answers.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${SPLITWISE_PYTHON:-.venv/bin/python}
URL=${SPLITWISE_URL:-http://127.0.0.1:8030}
PORT=${URL##*:}
PORT=${PORT%%/*}
STARTUP_TIMEOUT_S=${SPLITWISE_STARTUP_TIMEOUT:-900}
SEND=("$PY" -m splitwise_local.samples --url "$URL")
[ "${SPLITWISE_STREAM:-0}" = 1 ] && SEND+=(--stream)

if "$PY" -m splitwise_local.samples --url "$URL" --check; then
  echo "demo: using the system already running at $URL"
  exec "${SEND[@]}"
fi

LOG=${SPLITWISE_DEMO_LOG:-runs/demo-$(date +%Y%m%d-%H%M%S).log}
mkdir -p "$(dirname "$LOG")"
echo "demo: nothing answers at $URL; starting one (console in $LOG; takes a minute or two on a CPU)"
# In a session of its own, a Ctrl-C here reaches only this script, which then stops the
# launcher with one SIGTERM (the launcher's orderly shutdown).
setsid "$PY" -m splitwise_local --port "$PORT" "$@" >"$LOG" 2>&1 &
LAUNCHER=$!

stop_launcher() {
  if kill -0 "$LAUNCHER" 2>/dev/null; then
    echo "demo: stopping the system it started"
    kill -TERM "$LAUNCHER"
    wait "$LAUNCHER" || true
  fi
}
trap stop_launcher EXIT
trap 'exit 130' INT TERM

waited=0
until "$PY" -m splitwise_local.samples --url "$URL" --check; do
  if ! kill -0 "$LAUNCHER" 2>/dev/null; then
    echo "demo: the system failed to start; its console output:" >&2
    cat "$LOG" >&2
    exit 1
  fi
  if [ "$waited" -ge "$STARTUP_TIMEOUT_S" ]; then
    echo "demo: not ready after ${STARTUP_TIMEOUT_S} s; see $LOG" >&2
    exit 1
  fi
  sleep 2
  waited=$((waited + 2))
done

"${SEND[@]}"
