#!/usr/bin/env bash
# The connector's GPU data path on a GPU machine, in one command, in a few minutes, with nothing
# fetched: vLLM 0.32's KV layouts rebuilt as CUDA tensors and read and written by our adapter,
# a 7B-shaped model's KV for 1,500 tokens saved to and loaded from a real store over shared
# memory against plain pinned copies, and a 7B prefill's cost (splitwise_bench/gpu_check.py).
# Needs only PyTorch with CUDA, numpy, psutil, xxhash, PyYAML, aiohttp and prometheus-client
# (no vLLM). Writes runs/gpu-check.json (or --json PATH); exits 1 if a layout or a load is wrong.
#
#   bash scripts/gpu_check.sh [--dry-run] [--json PATH] [--device cuda:N]
#
# --dry-run: the same code on the CPU with tiny shapes (CI runs it). PYTHON picks the
# interpreter (default: python3); SPLITWISE_GPU_CHECK_TIMEOUT caps the run (default 470 s).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${SPLITWISE_GPU_CHECK_TIMEOUT:-470}" "${PYTHON:-python3}" \
    -m splitwise_bench.gpu_check "$@"
