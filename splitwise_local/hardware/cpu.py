"""What CPU this is: its model name and the instruction-set flags that decide how fast the
engine runs on it (AVX2, AVX-512, AVX512-BF16, AMX).

Machines of the same name differ: an "AMD EPYC" may be a Zen 3 with AVX2 only, where vLLM's bf16
linears fall back to torch and prefill is five times slower than fp32, or a Zen 4 with
AVX512-BF16, where bf16 is the faster one. Every benchmark records these facts, and the engine's
dtype is chosen per machine (`hardware/dtype.py`).
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# The flags that change which kernels vLLM's CPU build runs, in /proc/cpuinfo's spelling.
ISA_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
)
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_field(text: str, names: tuple[str, ...]) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in names:
            return value.strip()
    return ""


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (e.g. "AMD EPYC 9R14")."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return platform.processor() or platform.machine()
    return _cpuinfo_field(text, ("model name", "Model", "cpu model")) or platform.machine()


@lru_cache(maxsize=1)
def isa_flags() -> tuple[str, ...]:
    """The subset of `ISA_FLAGS` this CPU has, in `ISA_FLAGS` order."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return ()
    present = set(_cpuinfo_field(text, ("flags", "Features")).split())
    return tuple(flag for flag in ISA_FLAGS if flag in present)


def describe() -> str:
    """One line for banners and reports: "AMD EPYC [avx2 fma avx512f ...]"."""
    return f"{cpu_model()} [{' '.join(isa_flags()) or 'no listed ISA flags'}]"
