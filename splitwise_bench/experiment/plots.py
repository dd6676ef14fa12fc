"""The report's figures: attainment and goodput against rate per SLO family, TTFT and ITL CDFs,
the store's hit ratio over the run against the trace's ideal, and the admission curve."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from splitwise_bench.plots import cdf, cdf_axes, latencies, log_axis, pyplot, save

ATTAINMENT = "attainment.png"
CDFS = "cdf.png"
HIT_RATIO = "hit-ratio.png"
ADMISSION = "admission.png"


def _errorbar(ax, xs, spreads, label: str) -> None:
    mean = np.array([np.nan if s["mean"] is None else s["mean"] for s in spreads])
    low = np.array([np.nan if s["min"] is None else s["min"] for s in spreads])
    high = np.array([np.nan if s["max"] is None else s["max"] for s in spreads])
    ax.errorbar(xs, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=label)


def plot_attainment(azure: Mapping[str, Any], families: Mapping[str, Any], path: Path, goal: float):
    """Per family (a row): SLO attainment and goodput against the offered rate, per system,
    the mean over windows with bars from the lowest to the highest."""
    plt = pyplot()
    fig, axes = plt.subplots(len(families), 2, figsize=(12, 4 * len(families)), squeeze=False)
    for row, (family, spec) in zip(axes, families.items(), strict=True):
        for name, found in azure.items():
            if found is None:
                continue
            rates = [p["rate"] for p in found["curve"]]
            _errorbar(row[0], rates, [p[family]["attainment"] for p in found["curve"]], name)
            _errorbar(row[1], rates, [p[family]["goodput"] for p in found["curve"]], name)
        row[0].set(title=f"{spec.title}: SLO attainment", ylabel="share of requests")
        row[0].set_ylim(-0.02, 1.02)
        row[0].axhline(goal, color="grey", linestyle="--", linewidth=0.8)
        row[1].set(title=f"{spec.title}: goodput", ylabel="requests/s meeting the SLO")
        for ax in row:
            ax.set_xlabel("offered rate (req/s)")
            ax.grid(True, alpha=0.3)
            ax.legend()
    return save(fig, path)


def plot_cdfs(pooled: Mapping[str, Mapping[str, list[dict]]], path: Path) -> Path:
    """TTFT and ITL CDFs: one row per workload ({workload: {system: per-request records}})."""
    plt = pyplot()
    fig, axes = plt.subplots(len(pooled), 2, figsize=(12, 4 * len(pooled)), squeeze=False)
    for row, (workload, systems) in zip(axes, pooled.items(), strict=True):
        for name, records in systems.items():
            found = latencies({"per_request": records})
            cdf(row[0], found["TTFT"], name)
            cdf(row[1], found["ITL"], name)
        for ax, metric in zip(row, ("TTFT", "ITL"), strict=True):
            cdf_axes(ax, f"{workload}: {metric} CDF", metric)
    return save(fig, path)


def plot_hit_ratio(mooncake: Mapping[str, Any], path: Path) -> Path:
    """Per system (a panel): the measured ratio as the run went on against the trace's ideal
    under an LRU of the same capacity, both against prompt tokens served so far."""
    plt = pyplot()
    shown = {n: m for n, m in mooncake.items() if m}
    fig, axes = plt.subplots(
        1, max(len(shown), 1), figsize=(6 * max(len(shown), 1), 4.2), squeeze=False
    )
    for ax, (name, found) in zip(axes[0], shown.items(), strict=False):
        for seed in found["per_seed"]:
            measured = np.array(seed["over_run"]["measured"]).reshape(-1, 3)
            ideal = np.array(seed["over_run"]["ideal"]).reshape(-1, 2)
            line = ax.plot(measured[:, 1], measured[:, 2], marker=".", label=f"seed {seed['seed']}")
            ax.plot(
                ideal[:, 0],
                ideal[:, 1],
                linestyle="--",
                color=line[0].get_color(),
                label=f"seed {seed['seed']}: ideal",
            )
        what = "store hit ratio" if seed["store_hit_ratio"] is not None else "prompt tokens reused"
        ax.set(title=f"{name}: {what}", xlabel="prompt tokens served so far", ylabel="ratio")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path)


def plot_admission(points: list[dict[str, Any]], slo_ttft_ms: float, path: Path) -> Path:
    """Admitted requests' TTFT p50 and p99 against the SLO, and the share refused, per load."""
    plt = pyplot()
    good = [p for p in points if "error" not in p]
    loads = [p["load"] for p in good]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, label in (("admitted_ttft_p50_ms", "p50"), ("admitted_ttft_p99_ms", "p99")):
        left.plot(loads, [p[key] or np.nan for p in good], marker="o", label=f"TTFT {label}")
    left.axhline(slo_ttft_ms, color="grey", linestyle="--", linewidth=0.8, label="TTFT SLO")
    left.set(
        title="admitted requests",
        xlabel="offered load (x measured capacity)",
        ylabel="TTFT (ms, log)",
    )
    left.set_yscale("log")
    log_axis(left.yaxis)
    right.plot(loads, [p["refused"] / max(p["sent"], 1) for p in good], marker="o")
    right.set(
        title="refused (429/503)",
        xlabel="offered load (x measured capacity)",
        ylabel="share of requests",
    )
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    left.legend()
    return save(fig, path)
