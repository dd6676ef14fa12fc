"""How busy the machine was with other work while a benchmark ran.

The engine lock promises that no other engine runs, not that the machine is idle: other
people's tests, linters and builds share the same cores, and on two cores a single busy
process moves latencies by tens of percent. So every measured run also measures this: the CPU
time the whole machine spent (psutil's /proc/stat totals) minus the time spent by the processes
of the benchmark itself (the load generator and the system under test: given root processes
and all their descendants), over the run. A report can then say whether its numbers came from
an otherwise idle machine instead of assuming it.

Per process the count is user + system time of itself plus that of its children it has
reaped, so a helper that is born and reaped within the run is still counted as ours.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

# Foreign CPU above this share of the machine (cores x wall time) marks a run as not quiet.
QUIET_FRACTION = 0.05


def tree(roots: Iterable[int]) -> dict[int, psutil.Process]:
    """The root processes that still exist and all their descendants, by pid."""
    found: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    return found


def _cpu_seconds(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system
    except psutil.Error:
        return 0.0


@dataclass(frozen=True)
class Snapshot:
    wall_s: float
    busy_s: float  # all cores, all processes
    steal_s: float  # taken by the hypervisor for other guests
    ours: dict[int, float]  # pid -> CPU seconds of the benchmark's own processes


def snapshot(roots: Sequence[int]) -> Snapshot:
    cpu = psutil.cpu_times()
    idle = cpu.idle + getattr(cpu, "iowait", 0.0)
    steal = getattr(cpu, "steal", 0.0)
    total = sum(cpu)
    # guest time is already inside user on Linux; steal is not time this guest ran.
    busy = total - idle - steal - getattr(cpu, "guest", 0.0) - getattr(cpu, "guest_nice", 0.0)
    ours = {pid: _cpu_seconds(proc) for pid, proc in tree(roots).items()}
    return Snapshot(time.monotonic(), busy, steal, ours)


def compare(before: Snapshot, after: Snapshot, cores: int | None = None) -> dict[str, Any]:
    """CPU seconds used by the benchmark and by everything else between two snapshots."""
    cores = cores or psutil.cpu_count() or 1
    wall = max(after.wall_s - before.wall_s, 1e-9)
    # A process alive at both counts its growth; one born since counts from zero.
    ours = sum(cpu - before.ours.get(pid, 0.0) for pid, cpu in after.ours.items())
    busy = after.busy_s - before.busy_s
    foreign = max(busy - ours, 0.0)
    return {
        "wall_s": round(wall, 3),
        "cores": cores,
        "busy_core_s": round(busy, 3),
        "ours_core_s": round(ours, 3),
        "foreign_core_s": round(foreign, 3),
        "foreign_fraction": round(foreign / (wall * cores), 4),
        "steal_core_s": round(after.steal_s - before.steal_s, 3),
        "quiet": foreign / (wall * cores) <= QUIET_FRACTION,
    }


class HostLoad:
    """Measures around a block: `with HostLoad([pid]) as load: ...`, then `load.result`."""

    def __init__(self, roots: Sequence[int] | None = None) -> None:
        self.roots = list(roots) if roots is not None else [os.getpid()]
        self.result: dict[str, Any] = {}
        self._before: Snapshot | None = None

    def __enter__(self) -> HostLoad:
        self._before = snapshot(self.roots)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._before is not None
        self.result = compare(self._before, snapshot(self.roots))


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1/0.0.0.0 `port`, if this user may see it."""
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    except psutil.Error:
        return None
    return None


def wait_for_quiet(
    roots: Sequence[int], max_wait_s: float, window_s: float = 3.0
) -> dict[str, Any]:
    """Waits, up to `max_wait_s`, for a `window_s` window in which other processes use at most
    QUIET_FRACTION of the machine; says how long it waited and how busy the last window was.
    With `max_wait_s` 0 it only measures one window."""
    started = time.monotonic()
    while True:
        with HostLoad(roots) as load:
            time.sleep(window_s)
        waited = time.monotonic() - started
        if load.result["quiet"] or waited >= max_wait_s:
            return {
                "waited_s": round(waited, 1),
                "foreign_fraction": load.result["foreign_fraction"],
                "quiet": load.result["quiet"],
            }


def lock_status(path: Path) -> dict[str, Any]:
    """Who holds the flock(1) lock on `path`: this process or one of its ancestors (a run
    started as `flock PATH command`), someone else, or nobody (from /proc/locks)."""
    try:
        inode = path.stat().st_ino
        holders = [
            int(fields[4])
            for fields in (line.split() for line in Path("/proc/locks").read_text().splitlines())
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(f":{inode}")
        ]
    except (OSError, ValueError):
        return {"path": str(path), "held": None, "by_this_run": False}
    ancestors = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    return {
        "path": str(path),
        "held": bool(holders),
        "by_this_run": any(pid in ancestors for pid in holders),
    }
