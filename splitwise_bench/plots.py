"""PNG plots of `bench serve` and `bench sweep` results.

Latency CDFs and inter-token latency over time take several labelled runs (one for a plain
`bench serve`, one per system for the Splitwise experiment) in the JSON shape `bench serve`
writes, so one picture compares systems directly. The ITL-over-time plot marks when long-prompt
requests were sent: under the mixed workload that is where a colocated engine's decode stalls
behind prefill, the effect disaggregation removes. The attainment plot takes `bench sweep`
results: SLO attainment against request rate per system, with the spread across seeds.

matplotlib (the `bench` extra) is imported by the functions that draw, not at the top: it takes
a second, and every benchmark module is imported for `bench --help`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

LATENCY_CDF = "latency-cdf.png"
ITL_OVER_TIME = "itl-over-time.png"
ATTAINMENT = "attainment.png"


def pyplot():
    """matplotlib's pyplot drawing to files only, for every benchmark's figures."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def latencies(run: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """TTFT, ITL and E2E samples in ms from a run's per-request records."""
    done = [r for r in run["per_request"] if r["error"] is None and r["chunk_ms"]]
    return {
        "TTFT": np.array([r["ttft_ms"] for r in done]),
        "ITL": np.concatenate([np.diff(r["chunk_ms"]) for r in done] or [np.empty(0)]),
        "E2E": np.array([r["e2e_ms"] for r in done if r["e2e_ms"] is not None]),
    }


def save(fig, path: Path) -> Path:
    """Lays out `fig`, writes it to `path` and frees it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def cdf(ax, values: np.ndarray, label: str) -> None:
    """The empirical CDF of `values` as a step line (nothing when there are none)."""
    if values.size:
        xs = np.sort(values)
        ax.step(xs, np.arange(1, xs.size + 1) / xs.size, where="post", label=label)


def cdf_axes(ax, title: str, metric: str) -> None:
    """A latency CDF's axes: `metric` in ms on a log scale, the share of values up the side."""
    ax.set(title=title, xlabel=f"{metric} (ms, log scale)", ylabel="share")
    ax.set_xscale("log")
    log_axis(ax.xaxis)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def log_axis(axis) -> None:
    """Log scale labelled 1, 2, 5, 10, 20, ... in plain numbers (not 2x10^1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot_latency_cdfs(runs: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, run in runs.items():
        for ax, values in zip(axes, latencies(run).values(), strict=True):
            cdf(ax, values, label)
    for ax, metric in zip(axes, ("TTFT", "ITL", "E2E"), strict=True):
        cdf_axes(ax, f"{metric} CDF", metric)
    return save(fig, path)


def plot_itl_over_time(runs: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(
        len(runs), 1, figsize=(12, 3.2 * len(runs)), sharex=True, sharey=True, squeeze=False
    )
    for ax, (label, run) in zip(axes[:, 0], runs.items(), strict=True):
        for record in run["per_request"]:
            if record["error"] is None and len(record["chunk_ms"]) > 1:
                chunks = np.asarray(record["chunk_ms"])
                at = record["start_s"] + chunks[1:] / 1e3
                ax.scatter(at, np.diff(chunks), s=3, alpha=0.6, color="tab:blue")
            if record["kind"] == "long":
                ax.axvline(record["start_s"], color="tab:red", alpha=0.3, linewidth=0.8)
        ax.set(
            title=f"{label}: inter-token latency (red lines: long prompts sent)",
            ylabel="ITL (ms, log)",
        )
        ax.set_yscale("log")
        log_axis(ax.yaxis)
        ax.grid(True, which="both", alpha=0.3)
    axes[-1, 0].set_xlabel("time since the start of the run (s)")
    return save(fig, path)


def write_plots(
    runs: Mapping[str, Mapping[str, Any]], out_dir: Path, prefix: str = ""
) -> list[Path]:
    """Both plots into `out_dir`, file names starting with `prefix`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        plot_latency_cdfs(runs, out_dir / f"{prefix}{LATENCY_CDF}"),
        plot_itl_over_time(runs, out_dir / f"{prefix}{ITL_OVER_TIME}"),
    ]


def plot_attainment(sweeps: Mapping[str, Mapping[str, Any]], path: Path, goal: float = 0.9) -> Path:
    """SLO attainment (both SLOs, TTFT only, TPOT only) and ITL p99 against the request rate,
    one line per system: the mean over seeds, bars from the lowest to the highest seed."""
    plt = pyplot()
    panels = (
        ("attainment", "TTFT and TPOT SLOs met"),
        ("attainment_ttft", "TTFT SLO met"),
        ("attainment_tpot", "TPOT SLO met"),
        ("itl_p99_ms", "ITL p99 (ms, log)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.4))
    for label, sweep in sweeps.items():
        rates = np.array([point["rate"] for point in sweep["curve"]])
        for ax, (key, _) in zip(axes, panels, strict=True):
            spread = [point[key] for point in sweep["curve"]]
            mean = np.array([np.nan if s["mean"] is None else s["mean"] for s in spread])
            low = np.array([np.nan if s["min"] is None else s["min"] for s in spread])
            high = np.array([np.nan if s["max"] is None else s["max"] for s in spread])
            ax.errorbar(
                rates, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=label
            )
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.set(title=title, xlabel="request rate (req/s)")
        ax.grid(True, alpha=0.3)
        if key == "itl_p99_ms":
            ax.set_yscale("log")
            log_axis(ax.yaxis)
        else:
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(goal, color="grey", linestyle="--", linewidth=0.8)
        ax.legend()
    axes[0].set_ylabel("share of requests")
    return save(fig, path)
