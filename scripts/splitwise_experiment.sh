#!/usr/bin/env bash
# The Splitwise experiment, unattended: colocated (one engine on every core), data parallel (one
# engine per half of the cores), 1P1D (`--disagg always`) and `--disagg auto`, one after the other
# on the same cores, each swept over request rates with three seeds per rate, plus vLLM's own
# client beside ours, multi-turn and short-prompt workloads. Writes docs/benchmarks/splitwise-cpu
# .md/.json and the plots beside them; raw results and every log stay in runs/experiment-<time>/.
#
# The full run takes about 75 minutes on 2 cores (see docs/benchmarks/splitwise-cpu.md for the
# measured time); on this project's shared machines run it under the engine lock, on an otherwise
# idle machine:   flock /tmp/splitwise-engine.lock bash scripts/splitwise_experiment.sh
#
# Options go to `python -m splitwise_bench.experiment` (`--help` lists them): --short (tiny
# settings; CI runs it against fake engines), --systems colocated,dp, --placement, --out, --run-dir,
# --quiet-wait S. PYTHON picks the interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m splitwise_bench.experiment --python "$PY" "$@"
