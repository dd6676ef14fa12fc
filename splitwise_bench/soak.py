"""`bench soak --minutes N`: the mixed workload through the real system for N minutes, watching
for what only shows over time: errors, latency that creeps up, memory or file descriptors that
grow, a store that stops evicting.

It starts the whole system as a user does (or is handed a running one), sends `bench serve`'s
mixed workload (short prompts decoding while 1,024-token prompts arrive, Poisson arrivals, one
seed) for the given time, and every `--sample-every` seconds records the RSS and the open file
descriptors of every component (the proxy is the launcher's own process; an engine is its API
server and everything below it) and the store's items and evictions. The report: requests
served, unexpected errors (failed requests and count mismatches; goal 0), TTFT / ITL / E2E
percentiles per minute, each component's RSS drift from the end of the warm-up to the end
(goal at most 5%) and its file descriptors (goal: flat), evictions, and a PNG of all of it.
Ratios: RSS at the end over RSS after the warm-up, per component.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from splitwise_bench import report
from splitwise_bench.latency import percentiles_ms
from splitwise_bench.plots import pyplot
from splitwise_bench.streaming import RequestResult, run_load
from splitwise_bench.workloads import WorkloadSettings, build_workload, poisson_arrivals
from splitwise_local.models.checkpoint import prepare_default_model
from splitwise_local.serve.process import COMPONENT_ENV
from splitwise_testing.launch import Running, launch_system, leftovers, open_store, sweep

PROXY = "proxy"  # served inside the launcher's own process


def component_processes(system: Running) -> dict[str, list[psutil.Process]]:
    """Each component's processes now: the proxy (launcher) and every tagged component."""
    groups: dict[str, list[psutil.Process]] = defaultdict(list)
    groups[PROXY].append(psutil.Process(system.launch.popen.pid))
    for process in system.launch.processes():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            groups[process.environ().get(COMPONENT_ENV, "other")].append(process)
    return dict(groups)


def usage(processes: list[psutil.Process]) -> tuple[int, int]:
    """(RSS bytes, open file descriptors) summed over `processes` (gone ones count 0)."""
    rss = fds = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss += process.memory_info().rss
            fds += process.num_fds()
    return rss, fds


class Sampler:
    """Samples every component's RSS and fds and the store's counters, in a thread."""

    def __init__(self, system: Running, every_s: float) -> None:
        self.system = system
        self.every_s = every_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._store = open_store(system.launch.run_dir)

    def start(self) -> Sampler:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._store.close()

    def _run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._stop.wait(self.every_s):
                return

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t_s": time.monotonic() - self._began, "components": {}}
        for name, processes in component_processes(self.system).items():
            rss, fds = usage(processes)
            row["components"][name] = {"rss_mb": rss / 2**20, "fds": fds}
        try:
            stats = self._store.stats()
            row["store"] = {"items": stats["items"], "evictions": stats["evictions"]}
        except Exception as exc:  # a sample must never stop the soak
            row["store"] = {"error": repr(exc)}
        return row


def per_minute(results: list[RequestResult]) -> list[dict[str, Any]]:
    """Requests by the minute they were sent in: served, failed, TTFT / ITL / E2E percentiles."""
    minutes: dict[int, list[RequestResult]] = defaultdict(list)
    for result in results:
        minutes[int(result.start_s // 60)].append(result)
    rows = []
    for minute in sorted(minutes):
        done = [r for r in minutes[minute] if r.ok]
        rows.append(
            {
                "minute": minute,
                "sent": len(minutes[minute]),
                "served": len(done),
                "failed": len(minutes[minute]) - len(done),
                "ttft_ms": percentiles_ms([r.ttft_s for r in done]),
                "itl_ms": percentiles_ms([gap for r in done for gap in r.itl_s]),
                "e2e_ms": percentiles_ms([r.end_s for r in done if r.end_s is not None]),
            }
        )
    return rows


def drift(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, Any]]:
    """Per component: RSS and fds at the end of the warm-up and at the end, and RSS's ratio.

    Each end is the mean of the samples in its last tenth of the run (at least one), so a
    sample taken mid-request does not decide the verdict alone."""
    after = [s for s in samples if s["t_s"] >= warmup_s] or samples[-1:]
    span = max(1, len(after) // 10)
    first, last = after[:span], after[-span:]
    names = sorted({name for s in samples for name in s["components"]})
    found = {}
    for name in names:

        def mean(rows: list[dict[str, Any]], key: str, name: str = name) -> float:
            values = [r["components"][name][key] for r in rows if name in r["components"]]
            return float(np.mean(values)) if values else math.nan

        start, end = mean(first, "rss_mb"), mean(last, "rss_mb")
        fds = [s["components"][name]["fds"] for s in after if name in s["components"]]
        found[name] = {
            "rss_mb_after_warmup": start,
            "rss_mb_end": end,
            "rss_ratio": end / start if start else math.nan,
            "fds_after_warmup": mean(first, "fds"),
            "fds_end": mean(last, "fds"),
            "fds_min": min(fds, default=0),
            "fds_max": max(fds, default=0),
        }
    return found


def plot(report_data: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    fig, (lat, mem, fds) = plt.subplots(3, 1, figsize=(10, 11), sharex=False)
    minutes = report_data["per_minute"]
    xs = [row["minute"] + 0.5 for row in minutes]
    for metric, style in (("ttft_ms", "-"), ("e2e_ms", "--"), ("itl_ms", ":")):
        for pct in ("p50", "p99"):
            ys = [row[metric][pct] for row in minutes]
            lat.plot(xs, ys, style, marker="o", label=f"{metric[:-3].upper()} {pct}")
    lat.set(title="latency per minute", xlabel="minute", ylabel="ms (log)", yscale="log")
    lat.legend(ncol=3, fontsize="small")
    samples = report_data["samples"]
    names = sorted({name for s in samples for name in s["components"]})
    for name in names:
        ts = [s["t_s"] / 60 for s in samples if name in s["components"]]
        mem.plot(ts, [s["components"][name]["rss_mb"] for s in samples if name in s["components"]])
        fds.plot(ts, [s["components"][name]["fds"] for s in samples if name in s["components"]])
    warmup = report_data["settings"]["warmup_minutes"]
    for axis, label in ((mem, "RSS (MB)"), (fds, "open file descriptors")):
        axis.axvline(warmup, color="grey", linestyle=":", label="end of warm-up")
        axis.set(xlabel="minute", ylabel=label)
        axis.legend([*names, "end of warm-up"], fontsize="small")
    mem.set_title("memory per component")
    fds.set_title("file descriptors per component")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def soak(
    system: Running,
    minutes: float,
    rate: float,
    warmup_minutes: float,
    sample_every_s: float,
    seed: int = 0,
    request_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Runs the soak against `system` and returns its report (no plot, nothing printed)."""
    from transformers import AutoTokenizer  # heavy: imported by a run, not by `bench --help`

    planned = poisson_arrivals(math.ceil(rate * minutes * 60 * 1.2) + 1, rate, seed)
    arrivals = [t for t in planned if t < minutes * 60]
    settings = WorkloadSettings(kind="mixed", num_requests=len(arrivals), seed=seed)
    specs = build_workload(settings, AutoTokenizer.from_pretrained(prepare_default_model()))
    sampler = Sampler(system, sample_every_s).start()
    try:
        results, duration = asyncio.run(
            run_load(
                system.url,
                system.model,
                specs,
                arrivals=arrivals,
                concurrency=len(specs),
                timeout_s=request_timeout_s,
                progress=False,
            )
        )
    finally:
        sampler.stop()
    failed = [r for r in results if not r.ok]
    mismatched = [r for r in results if r.problems()]
    errors = {r.error or "" for r in failed} | {p for r in mismatched for p in r.problems()}
    samples = sampler.samples
    evictions = [s["store"].get("evictions") for s in samples if "evictions" in s["store"]]
    components = drift(samples, warmup_minutes * 60)
    return {
        "benchmark": "soak",
        "settings": {
            "minutes": minutes,
            "rate": rate,
            "warmup_minutes": warmup_minutes,
            "sample_every_s": sample_every_s,
            "workload": settings.kind,
            "seed": seed,
        },
        "duration_s": duration,
        "requests": len(results),
        "served": len(results) - len(failed),
        "unexpected_errors": len(failed) + len(mismatched),
        "errors": sorted(errors)[:20],
        "per_minute": per_minute(results),
        "components": components,
        "store_evictions": (evictions[-1] - evictions[0]) if evictions else None,
        "samples": samples,
        "ratios": {f"{name}_rss_end_vs_warmup": c["rss_ratio"] for name, c in components.items()},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to send requests")
    parser.add_argument("--rate", type=float, default=0.5, help="Poisson arrivals per second")
    parser.add_argument(
        "--warmup-minutes", type=float, help="excluded from the drift (default: a sixth, at most 5)"
    )
    parser.add_argument("--sample-every", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", metavar="PNG", help="default: next to --json, else soak.png")
    parser.add_argument("--run-dir", default="runs/bench-soak", help="the system's run folder")


def print_report(data: dict[str, Any]) -> None:
    rows = [
        [
            row["minute"],
            row["served"],
            row["failed"],
            row["ttft_ms"]["p50"],
            row["ttft_ms"]["p99"],
            row["itl_ms"]["p99"],
            row["e2e_ms"]["p50"],
            row["e2e_ms"]["p99"],
        ]
        for row in data["per_minute"]
    ]
    headers = ["minute", "served", "failed", "TTFT p50", "TTFT p99", "ITL p99", "E2E p50"]
    report.print_table("bench soak: per minute (ms)", [*headers, "E2E p99"], rows)
    rows = [
        [
            name,
            c["rss_mb_after_warmup"],
            c["rss_mb_end"],
            c["rss_ratio"],
            c["fds_after_warmup"],
            c["fds_end"],
            f"{c['fds_min']}-{c['fds_max']}",
        ]
        for name, c in data["components"].items()
    ]
    report.print_table(
        "bench soak: per component after the warm-up",
        ["component", "RSS MB start", "RSS MB end", "ratio", "fds start", "fds end", "fds range"],
        rows,
    )
    print(
        f"requests {data['requests']}, served {data['served']}, unexpected errors "
        f"{data['unexpected_errors']}, store evictions {data['store_evictions']}"
    )


def run(args: argparse.Namespace) -> int:
    warmup = args.warmup_minutes
    if warmup is None:
        warmup = min(5.0, args.minutes / 6)
    run_dir = Path(args.run_dir).resolve()
    system = launch_system(run_dir, health_deadline_s=30.0)
    try:
        data = soak(system, args.minutes, args.rate, warmup, args.sample_every, args.seed)
    finally:
        system.launch.stop()
        left = leftovers(run_dir)
        sweep(run_dir)
    data["leftover_processes"] = left
    print_report(data)
    plot_path = Path(
        args.plot or (Path(args.json).with_suffix(".png") if args.json else "soak.png")
    )
    report.write_json(args.json, data)  # first: a failing plot must not lose a long run's data
    print(f"wrote {plot(data, plot_path)}")
    return 0 if data["unexpected_errors"] == 0 and not left else 1
