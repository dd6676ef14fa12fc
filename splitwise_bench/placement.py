"""Where the processes of a benchmark run: CPU affinity for the load generator, proxy, engines.

On a two-core machine every process of an experiment shares the cores with the engines' compute
threads: the load generator, the proxy, and each vLLM engine's API server and scheduler (vLLM
binds only its OpenMP compute threads, `VLLM_CPU_OMP_THREADS_BIND`). Where those land moves
latencies by tens of percent: an OpenMP step waits for its slowest thread, so a busy process
sharing a core with one of a two-thread engine's threads stalls the whole step. The experiment
therefore places them explicitly and the same way for every system, and its report says where.

Affinity is set per thread (Linux applies `sched_setaffinity` to one thread id), on threads that
exist when it is called; threads started later inherit their creator's mask. An engine's
threads are only ever narrowed to the engine's own cores: its OpenMP threads, already bound to
one core each, keep their binding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

Cores = frozenset[int]


def format_cores(cores: Iterable[int]) -> str:
    return ",".join(map(str, sorted(cores)))


def threads(pid: int) -> list[int]:
    """Thread ids of a process (empty if it is gone)."""
    try:
        return [int(name) for name in os.listdir(Path("/proc") / str(pid) / "task")]
    except OSError:
        return []


def family(pid: int) -> list[int]:
    """A process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.Error:
        return []


def pin_threads(pids: Iterable[int], cores: Cores, *, narrow_only: bool = False) -> int:
    """Sets every thread of `pids` to `cores`; with `narrow_only`, a thread whose mask already
    lies within `cores` keeps it. Returns how many threads changed (gone ones are skipped)."""
    changed = 0
    for pid in pids:
        for tid in threads(pid):
            try:
                current = os.sched_getaffinity(tid)
                if current == cores or (narrow_only and current <= cores):
                    continue
                os.sched_setaffinity(tid, cores)
                changed += 1
            except OSError:  # the thread ended meanwhile
                continue
    return changed


@dataclass(frozen=True)
class Placement:
    """Cores for the load generator and the proxy (None: wherever the kernel puts them, over
    every core), and whether each engine's other processes are kept on the engine's cores."""

    name: str
    load_generator: Cores | None
    proxy: Cores | None
    contain_engines: bool = False

    def describe(self) -> str:
        def where(cores: Cores | None) -> str:
            return "any core" if cores is None else f"core(s) {format_cores(cores)}"

        engines = (
            "each engine's API server and scheduler kept on the engine's own cores"
            if self.contain_engines
            else "each engine's API server and scheduler on any core"
        )
        return (
            f"load generator on {where(self.load_generator)}, proxy on {where(self.proxy)}; "
            f"{engines}; each engine's compute threads bound to its cores by vLLM"
        )

    def preexec(self):
        """A `preexec_fn` that starts the load generator on its cores (None: no pinning)."""
        cores = self.load_generator
        if cores is None:
            return None
        return lambda: os.sched_setaffinity(0, cores)
