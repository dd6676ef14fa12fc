#!/usr/bin/env bash
# The Splitwise experiment on public traces, unattended: colocated (one engine on every core),
# data parallel (one engine per half of the cores), 1P1D (`--disagg always`) and `--disagg auto`,
# one after the other on the same cores, each replaying the Azure conversation trace at several
# rates and (colocated, 1P1D, auto) Kimi's Mooncake conversation trace; then auto with admission
# control at 1x-3x its measured capacity. SLO families, goals and how much is sent are fixed in
# splitwise_bench/experiment/goals.yaml. Writes docs/benchmarks/splitwise-traces.md/.json and the
# plots beside them; raw results and every log stay in runs/experiment-<time>/.
#
# The full plan takes about 80 minutes on 2 cores; on this project's shared machines run it under
# the engine lock, held for the whole run:
#   flock /tmp/splitwise-engine.lock bash scripts/splitwise_experiment.sh
#
# Options go to `python -m splitwise_bench.experiment` (`--help` lists them): --short (the short
# plan; CI runs it against fake engines), --systems colocated,dp, --out, --run-dir, --model.
# PYTHON picks the interpreter (default .venv/bin/python). The report can be rewritten from a run
# folder: python -m splitwise_bench.experiment.report --run-dir runs/experiment-X --out PATH
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m splitwise_bench.experiment --python "$PY" "$@"
