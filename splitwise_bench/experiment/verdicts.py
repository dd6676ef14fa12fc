"""The run's summary: every phase's numbers per system, each goal judged, how quiet it was.

`summarize` is what the report's markdown and JSON are written from; each goal's `measure`
(goals.yaml) names one function here that reads its value out of the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from splitwise_bench.experiment import analysis
from splitwise_bench.experiment.plan import BASELINES, DISAGGREGATED, Goal, Goals

Summary = dict[str, Any]


def summarize(run: Mapping[str, Any], goals: Goals) -> Summary:
    """Per system its azure curves and Mooncake figures, the admission curve, the goals judged,
    the top-level ratios and the machine's quietness."""
    systems = {n: s for n, s in run["systems"].items() if n != "admission"}
    out: Summary = {
        "azure": {n: analysis.azure_summary(s, goals) for n, s in systems.items()},
        "mooncake": {n: analysis.mooncake_summary(s, n, goals) for n, s in systems.items()},
        "admission": None,
    }
    admitted = run["systems"].get("admission")
    if admitted is not None:
        slo = goals.families["ttft_bound"].ttft_ms
        out["admission"] = {
            "capacity": admitted["entry"].get("capacity"),
            "description": admitted["entry"].get("description"),
            "error": admitted["entry"].get("error"),
            "points": analysis.admission_summary(admitted["admission"], slo),
        }
    out["goals"] = {name: judge(goal, out, goals) for name, goal in goals.goals.items()}
    out["ratios"] = ratios(out)
    out["quietness"] = quietness(run)
    return out


def _peak(summary: Summary, names: tuple[str, ...], family: str) -> tuple[str | None, Any]:
    found = [
        (n, s["families"][family]["peak_goodput"])
        for n, s in summary["azure"].items()
        if n in names and s is not None
    ]
    found = [(n, p) for n, p in found if p["mean"] is not None]
    return max(found, key=lambda f: f[1]["mean"]) if found else (None, None)


def peak_goodput_ratio(goal: Goal, summary: Summary) -> tuple[float | None, str]:
    family = goal.family or "itl_bound"
    best, top = _peak(summary, DISAGGREGATED, family)
    base, bottom = _peak(summary, BASELINES, family)
    if top is None or bottom is None or not bottom["mean"]:
        return None, f"peak goodput: {best} {_v(top)} against {base} {_v(bottom)} req/s"
    return top["mean"] / bottom["mean"], (
        f"peak goodput (mean over windows): {best} {top['mean']:.3g} req/s at {top['rate']:g} "
        f"req/s offered, against {base} {bottom['mean']:.3g} req/s at {bottom['rate']:g}"
    )


def store_hit_vs_ideal(goal: Goal, summary: Summary) -> tuple[float | None, str]:
    name = (goal.systems or ("1p1d",))[0]
    found = summary["mooncake"].get(name)
    if not found:
        return None, f"{name} has no Mooncake run"
    per_seed = [
        s["store_hit_ratio"] / s["ideal_at_store"]
        for s in found["per_seed"]
        if s["store_hit_ratio"] is not None and s["ideal_at_store"]
    ]
    ratio = analysis.spread(per_seed)
    return ratio["mean"], (
        f"{name}: store hit ratio {_s(found['store_hit_ratio'])} against the ideal at the "
        f"store's capacity {_s(found['ideal_at_store'])}; per seed {_s(ratio)}"
    )


def mooncake_ttft_p50_ratio(goal: Goal, summary: Summary) -> tuple[float | None, str]:
    base = summary["mooncake"].get("colocated")
    if not base:
        return None, "colocated has no Mooncake run"
    by_seed = {s["seed"]: s["ttft_p50_ms"] for s in base["per_seed"]}
    best: tuple[float, str] | None = None
    notes = []
    for name in goal.systems or DISAGGREGATED:
        found = summary["mooncake"].get(name)
        if not found:
            continue
        each = [
            s["ttft_p50_ms"] / by_seed[s["seed"]]
            for s in found["per_seed"]
            if by_seed.get(s["seed"])
        ]
        ratio = analysis.spread(each)
        notes.append(f"{name} {_s(found['ttft_p50_ms'])} ms ({_s(ratio)}x)")
        if ratio["mean"] is not None and (best is None or ratio["mean"] < best[0]):
            best = (ratio["mean"], name)
    detail = f"TTFT p50 against colocated {_s(base['ttft_p50_ms'])} ms: " + "; ".join(notes)
    return (best[0] if best else None), detail


def admitted_ttft_p99_vs_slo(goal: Goal, summary: Summary) -> tuple[float | None, str]:
    admission = summary["admission"] or {}
    point = next((p for p in admission.get("points", []) if p.get("load") == goal.load), None)
    if point is None or "error" in point:
        return None, f"no admission run at {goal.load:g}x capacity"
    return point["admitted_ttft_p99_vs_slo"], (
        f"at {goal.load:g}x capacity ({point['rate']:.3g} req/s): {point['admitted']} admitted, "
        f"{point['refused']} refused, {point['failed']} failed; admitted TTFT p99 "
        f"{_v(point['admitted_ttft_p99_ms'])} ms"
    )


MEASURE_FUNCTIONS: dict[str, Callable[[Goal, Summary], tuple[float | None, str]]] = {
    "peak_goodput_ratio": peak_goodput_ratio,
    "store_hit_vs_ideal": store_hit_vs_ideal,
    "mooncake_ttft_p50_ratio": mooncake_ttft_p50_ratio,
    "admitted_ttft_p99_vs_slo": admitted_ttft_p99_vs_slo,
}


def judge(goal: Goal, summary: Summary, goals: Goals) -> dict[str, Any]:
    measured, detail = MEASURE_FUNCTIONS[goal.measure](goal, summary)
    return {
        "text": goal.text,
        "measure": goal.measure,
        "direction": goal.direction,
        "target": goal.target,
        "measured": measured,
        "met": goal.met(measured),
        "detail": detail,
    }


def ratios(summary: Summary) -> dict[str, float | None]:
    """The JSON's top-level `ratios`: each goal's measured value, and per family the best
    disaggregated system's peak goodput over the better baseline's."""
    found = {name: goal["measured"] for name, goal in summary["goals"].items()}
    families = {f for s in summary["azure"].values() if s for f in s["families"]}
    for family in sorted(families):
        measured, _ = peak_goodput_ratio(Goal("", "", "", ">=", 0, family), summary)
        found[f"peak_goodput_disaggregated_vs_baseline_{family}"] = measured
    return found


def quietness(run: Mapping[str, Any]) -> dict[str, Any]:
    """Other processes' share of the CPU during each measured run, per system and overall."""
    per_system, every = {}, []
    for name, system in run["systems"].items():
        runs = system["azure"] + system["mooncake"] + system["admission"]
        shares = [(r["result"].get("host_load") or {}).get("foreign_fraction") for r in runs]
        shares = [s for s in shares if s is not None]
        every += shares
        if shares:
            per_system[name] = {
                "mean": float(np.mean(shares)),
                "max": max(shares),
                "runs": len(shares),
            }
    manifest = run["manifest"]
    waits = [m.get("quiet_wait") or {} for m in (manifest.get("runs") or {}).values()]
    return {
        "per_system": per_system,
        "mean": float(np.mean(every)) if every else None,
        "max": max(every) if every else None,
        "runs": len(every),
        "quiet_before": sum(bool(w.get("quiet")) for w in waits),
        "engine_lock": manifest.get("engine_lock"),
    }


def _v(value: Any) -> str:
    if isinstance(value, Mapping):
        value = value.get("mean")
    return "–" if value is None else f"{value:,.3g}"


def _s(found: Mapping[str, Any] | None) -> str:
    """`mean [min–max]` of a spread."""
    if not found or found.get("mean") is None:
        return "–"
    return f"{found['mean']:.3g} [{found['min']:.3g}–{found['max']:.3g}]"
