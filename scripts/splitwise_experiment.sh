#!/usr/bin/env bash
# The Splitwise experiment on this machine: the same mixed workload (short chats plus long prompts
# that arrive while others decode), at the same Poisson rate and seed, against
#   (a) colocated:     one plain vLLM engine using all the cores this process may use, and
#   (b) disaggregated: `python -m splitwise_local` (store, prefill engine and decode engine on
#                      their own halves of the cores, KV through the store, the proxy in front),
# one after the other, so they never share the CPU. Writes docs/benchmarks/splitwise-cpu.md and
# .json (entries `colocated` and `disaggregated`) and the plots beside them; raw results and every
# log stay in runs/experiment-<time>/. About 10 minutes on 2 cores with the embedded model.
#
# Settings (environment, defaults in brackets): SEED [0], RATE requests/s [0.5], REQUESTS [60],
# PROMPT_LEN [128], OUTPUT_LEN [64], LONG_PROMPT_LEN [1024], LONG_OUTPUT_LEN [16],
# LONG_FRACTION [0.25], SLO_TTFT_MS [2000], SLO_TPOT_MS [100], MODEL (checkpoint folder; default
# the embedded SmolLM2), OUT [docs/benchmarks/splitwise-cpu], RUN_DIR [runs/experiment-<time>],
# READY_TIMEOUT seconds [600], PYTHON [.venv/bin/python],
# ports PLAIN_PORT [8101], PROXY_PORT [8030], PREFILL_PORT [8010], DECODE_PORT [8020],
# STORE_PORT [10080]. Exit status 0 when both runs produced checked results; the report is
# written either way, saying what is missing and why.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
SEED=${SEED:-0}
RATE=${RATE:-0.5}
REQUESTS=${REQUESTS:-60}
PROMPT_LEN=${PROMPT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
LONG_PROMPT_LEN=${LONG_PROMPT_LEN:-1024}
LONG_OUTPUT_LEN=${LONG_OUTPUT_LEN:-16}
LONG_FRACTION=${LONG_FRACTION:-0.25}
SLO_TTFT_MS=${SLO_TTFT_MS:-2000}
SLO_TPOT_MS=${SLO_TPOT_MS:-100}
OUT=${OUT:-docs/benchmarks/splitwise-cpu}
READY_TIMEOUT=${READY_TIMEOUT:-600}
PLAIN_PORT=${PLAIN_PORT:-8101}
PROXY_PORT=${PROXY_PORT:-8030}
PREFILL_PORT=${PREFILL_PORT:-8010}
DECODE_PORT=${DECODE_PORT:-8020}
STORE_PORT=${STORE_PORT:-10080}
STOP_GRACE=60

RUN_DIR=${RUN_DIR:-runs/experiment-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN_DIR"
log() { echo "[experiment $(date +%H:%M:%S)] $*"; }

MODEL_DIR=${MODEL:-$("$PY" -m splitwise_local model prepare)}
CORES=$("$PY" -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0)))))')
MODEL_ARGS=()
[ -n "${MODEL:-}" ] && MODEL_ARGS=(--model "$MODEL")

WORKLOAD=(
  --workload mixed --num-requests "$REQUESTS" --rate "$RATE" --seed "$SEED"
  --prompt-len "$PROMPT_LEN" --output-len "$OUTPUT_LEN"
  --long-prompt-len "$LONG_PROMPT_LEN" --long-output-len "$LONG_OUTPUT_LEN"
  --long-fraction "$LONG_FRACTION" --slo-ttft-ms "$SLO_TTFT_MS" --slo-tpot-ms "$SLO_TPOT_MS"
  --warmup 2 --model "$MODEL_DIR"
)

# One system runs at a time, in its own process group (setsid), so stopping it reaches vLLM's
# own children too; the trap stops it on any exit, including Ctrl-C and a failed step.
CHILD=""
stop_child() {
  [ -n "$CHILD" ] || return 0
  if kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM -- "-$CHILD" 2>/dev/null || true
    for _ in $(seq "$STOP_GRACE"); do
      kill -0 "$CHILD" 2>/dev/null || break
      sleep 1
    done
    kill -KILL -- "-$CHILD" 2>/dev/null || true
  fi
  wait "$CHILD" 2>/dev/null || true
  CHILD=""
}
trap stop_child EXIT
trap 'exit 130' INT TERM

start_child() {  # LOGFILE COMMAND...
  local logfile=$1
  shift
  setsid "$@" >"$logfile" 2>&1 &
  CHILD=$!
}

ports_free() {  # PORT...: fail, naming the port, if something already listens there
  "$PY" - "$@" <<'EOF'
import socket, sys
for port in map(int, sys.argv[1:]):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            sys.exit(f"port {port} is already in use: stop what listens there or set its *_PORT")
EOF
}

wait_ready() {  # URL LOGFILE: until URL/v1/models answers, the child dies, or READY_TIMEOUT
  local url=$1 logfile=$2 deadline=$((SECONDS + READY_TIMEOUT))
  until "$PY" -c 'import httpx, sys; httpx.get(sys.argv[1], timeout=5).raise_for_status()' \
      "$url/v1/models" 2>/dev/null; do
    if ! kill -0 "$CHILD" 2>/dev/null; then
      log "it exited before answering; last lines of $logfile:"
      tail -n 20 "$logfile"
      return 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log "no answer from $url within ${READY_TIMEOUT}s; last lines of $logfile:"
      tail -n 20 "$logfile"
      return 1
    fi
    sleep 1
  done
}

bench() {  # LABEL URL [bench serve options...]
  local label=$1 url=$2
  shift 2
  "$PY" -m splitwise_local bench serve --url "$url" --label "$label" --no-progress \
    --json "$RUN_DIR/$label.json" "${WORKLOAD[@]}" "$@" 2>&1 | tee "$RUN_DIR/$label-bench.log"
  return "${PIPESTATUS[0]}"
}

status=0
started=$SECONDS
log "run folder $RUN_DIR; model $MODEL_DIR; cores $CORES; seed $SEED; rate $RATE/s"

log "(a) colocated: one plain vLLM engine on cores $CORES"
ports_free "$PLAIN_PORT"
start_child "$RUN_DIR/colocated-engine.log" "$PY" -m splitwise_local engine --role plain \
  --port "$PLAIN_PORT" --cpu-cores "$CORES" "${MODEL_ARGS[@]}"
PLAIN_URL=http://127.0.0.1:$PLAIN_PORT
if wait_ready "$PLAIN_URL" "$RUN_DIR/colocated-engine.log"; then
  log "engine ready after $((SECONDS - started))s; sending the workload"
  bench colocated "$PLAIN_URL" --metrics-url "$PLAIN_URL/metrics" || status=1
else
  status=1
fi
stop_child

log "(b) disaggregated: python -m splitwise_local (prefill and decode on halves of $CORES)"
ports_free "$PROXY_PORT" "$PREFILL_PORT" "$DECODE_PORT" "$STORE_PORT"
phase=$SECONDS
start_child "$RUN_DIR/disaggregated-launcher.log" "$PY" -m splitwise_local serve \
  --port "$PROXY_PORT" --prefill-port "$PREFILL_PORT" --decode-port "$DECODE_PORT" \
  --store-port "$STORE_PORT" --run-dir "$RUN_DIR/disaggregated" --log-level warning \
  "${MODEL_ARGS[@]}"
PROXY_URL=http://127.0.0.1:$PROXY_PORT
if wait_ready "$PROXY_URL" "$RUN_DIR/disaggregated-launcher.log"; then
  log "system ready after $((SECONDS - phase))s; sending the workload"
  bench disaggregated "$PROXY_URL" --store-url "lm://127.0.0.1:$STORE_PORT" \
    --metrics-url "http://127.0.0.1:$PREFILL_PORT/metrics" \
    --metrics-url "http://127.0.0.1:$DECODE_PORT/metrics" \
    --metrics-url "$PROXY_URL/metrics" || status=1
else
  status=1
fi
stop_child

log "writing the report to $OUT.md"
"$PY" -m splitwise_local.bench.experiment_report --out "$OUT" \
  --run "colocated=$RUN_DIR/colocated.json" --run "disaggregated=$RUN_DIR/disaggregated.json" \
  --log "colocated=$RUN_DIR/colocated-engine.log" \
  --log "disaggregated=$RUN_DIR/disaggregated-launcher.log" \
  --describe "colocated=one plain vLLM engine (\`engine --role plain\`) bound to cores $CORES" \
  --describe "disaggregated=\`python -m splitwise_local\`: KV store, prefill and decode engines \
each bound to half of cores $CORES, the proxy in front; KV moves through the store"
log "done in $((SECONDS - started))s (exit status $status)"
exit "$status"
