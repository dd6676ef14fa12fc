"""The Splitwise experiment's report, written from a run folder that experiment.py filled.

It reads `manifest.json` and each system's results (`<system>/sweep.json`, `vllm.json`,
`crosscheck.json`, `multi-turn.json`, `short.json`, and `placement/*.json`) and writes
`<out>.md` and `<out>.json` with the plots beside them. The report states how quiet the machine
was, where every process ran, the SLOs and why, the attainment curves, each system's highest
rate at 90% attainment with its spread across seeds, every goal with its measured value (met or
missed), where disaggregation loses, and vLLM's client beside ours. The JSON holds the same
numbers (per-request records left out) with `goals` and a top-level `ratios` object. A system
that did not run is reported as such, with the error and its log's tail.

    python -m splitwise_bench.experiment.experiment_report --run-dir runs/experiment-X \\
        --out docs/benchmarks/splitwise-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitwise_bench import plots, report, vllm_client

BASELINES = ("colocated", "dp")
DISAGGREGATED = ("1p1d", "auto")
PHASE_FILES = {
    "sweep": "sweep.json",
    "vllm": "vllm.json",
    "crosscheck": "crosscheck.json",
    "multi_turn": "multi-turn.json",
    "short": "short.json",
}
PLACEMENT_FILES = ("float", "core0", "core1")
LOG_SUFFIXES = (".log", ".stdout", ".stderr")
LOG_TAIL_LINES = 30
# The issues' goals, as (name, issue, direction, target).
CAPACITY_GOAL = 1.5
HEADLINE_TTFT_GOAL, HEADLINE_ITL_GOAL = 1.5, 0.5
MULTI_TURN_TTFT_GOAL, MULTI_TURN_ITL_GOAL = 0.6, 1.1
SHORT_THROUGHPUT_GOAL = 1.0
SLO_REASON = (
    "TTFT {ttft:,.0f} ms, TPOT {tpot:,.0f} ms (the issue's example values, chosen before the "
    "run and not tuned to it). TPOT {tpot:,.0f} ms is 20 tokens/s, several times reading speed; "
    "against a lone request's decode step (light-load TPOT below) it leaves a request room to "
    "spend a large share of its decode time stalled behind other work. TTFT {ttft:,.0f} ms is "
    "about twice what one core needs to prefill the workload's longest prompt alone (light-load "
    "TTFT of long prompts below)."
)


def _read(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text())
        return found if isinstance(found, dict) else {"error": f"{path} is not a JSON object"}
    except (OSError, json.JSONDecodeError) as exc:
        return {"error": f"no results: {exc}"}


def _tail(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return []


def load_run(run_dir: Path) -> dict[str, Any]:
    """The manifest and every result file of a run folder (missing ones as {"error": ...})."""
    manifest = _read(run_dir / "manifest.json")
    systems: dict[str, dict[str, Any]] = {}
    for name, entry in (manifest.get("systems") or {}).items():
        found: dict[str, Any] = {"entry": entry}
        for key, file in PHASE_FILES.items():
            found[key] = _read(run_dir / name / file)
        if "error" in entry:
            folder = run_dir / name  # children's logs, the launcher's stdout and stderr
            logs = sorted(
                p for p in folder.glob("*.*") if p.suffix in (".log", ".stdout", ".stderr")
            )
            found["log_tail"] = {log.name: _tail(log) for log in logs}
        systems[name] = found
    study = {name: _read(run_dir / "placement" / f"{name}.json") for name in PLACEMENT_FILES}
    return {"manifest": manifest, "systems": systems, "placement": study}


# -- numbers ------------------------------------------------------------------------------


def _dig(value: Any, *path: str) -> Any:
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _ok(result: Mapping[str, Any] | None) -> bool:
    return bool(result) and "error" not in result


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def capacity(system: Mapping[str, Any]) -> float | None:
    """A system's highest rate at 90% attainment: the mean over seeds (interpolated)."""
    return _dig(system, "sweep", "capacity", "interpolated", "mean")


def _goal(
    measured: float | None, target: float, direction: str, issue: str, detail: str
) -> dict[str, Any]:
    met = None
    if measured is not None:
        met = measured <= target if direction == "<=" else measured >= target
    return {
        "measured": measured,
        "target": target,
        "direction": direction,
        "met": met,
        "issue": issue,
        "detail": detail,
    }


def _best(systems: Mapping[str, Any], names: Sequence[str]) -> tuple[str | None, float | None]:
    found = [(n, capacity(systems[n])) for n in names if n in systems]
    found = [(n, c) for n, c in found if c is not None]
    return max(found, key=lambda item: item[1]) if found else (None, None)


def goals(systems: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every goal of the experiment's issues, judged from this run's numbers."""
    out: dict[str, dict[str, Any]] = {}
    base, base_cap = _best(systems, BASELINES)
    best, best_cap = _best(systems, DISAGGREGATED)
    out["best disaggregated capacity / best colocated baseline"] = _goal(
        _ratio(best_cap, base_cap),
        CAPACITY_GOAL,
        ">=",
        "#17",
        f"highest rate at 90% SLO attainment, mean over seeds: {best} {_n(best_cap)} req/s "
        f"against {base} {_n(base_cap)} req/s",
    )
    for name, system in systems.items():
        if _ok(system.get("vllm")) and _ok(system.get("crosscheck")):
            check = vllm_client.cross_check(system["crosscheck"], system["vllm"])
            worst = max(
                (abs(r["ratio"] - 1) for r in check["stats"].values() if r["ratio"] is not None),
                default=None,
            )
            out[f"{name}: bench serve vs vLLM's client, largest difference"] = _goal(
                worst,
                vllm_client.CROSS_CHECK_TOLERANCE,
                "<=",
                "#17",
                "TTFT, TPOT and ITL, p50 and mean, same shape, rate and server",
            )

    def vllm_stat(name: str, metric: str, stat: str) -> float | None:
        return _dig(systems.get(name, {}), "vllm", metric, stat)

    for cand in DISAGGREGATED:
        out[f"{cand} TTFT p50 / colocated (vLLM's client, random 1,024/64)"] = _goal(
            _ratio(vllm_stat(cand, "ttft_ms", "p50"), vllm_stat("colocated", "ttft_ms", "p50")),
            HEADLINE_TTFT_GOAL,
            "<=",
            "#16" if cand == "auto" else "#16 (for reference)",
            "the #16 headline run",
        )
        out[f"{cand} ITL p99 / colocated (vLLM's client, random 1,024/64)"] = _goal(
            _ratio(vllm_stat(cand, "itl_ms", "p99"), vllm_stat("colocated", "itl_ms", "p99")),
            HEADLINE_ITL_GOAL,
            "<=",
            "#16" if cand == "auto" else "#16 (for reference)",
            "the #16 headline run",
        )

    def phase(name: str, key: str, *path: str) -> float | None:
        return _dig(systems.get(name, {}), key, *path)

    out["multi-turn: auto TTFT p50 / always (1p1d)"] = _goal(
        _ratio(
            phase("auto", "multi_turn", "ttft_ms", "p50"),
            phase("1p1d", "multi_turn", "ttft_ms", "p50"),
        ),
        MULTI_TURN_TTFT_GOAL,
        "<=",
        "#16",
        "each turn resends its conversation's history",
    )
    out["multi-turn: auto ITL p99 / always (1p1d)"] = _goal(
        _ratio(
            phase("auto", "multi_turn", "itl_ms", "p99"),
            phase("1p1d", "multi_turn", "itl_ms", "p99"),
        ),
        MULTI_TURN_ITL_GOAL,
        "<=",
        "#16",
        "each turn resends its conversation's history",
    )
    out["short prompts: auto output tokens/s / colocated"] = _goal(
        _ratio(
            phase("auto", "short", "output_tokens_per_s"),
            phase("colocated", "short", "output_tokens_per_s"),
        ),
        SHORT_THROUGHPUT_GOAL,
        ">=",
        "#16",
        "closed loop, prompts under the threshold",
    )
    return out


def ratios(systems: Mapping[str, Any], judged: Mapping[str, Any]) -> dict[str, float | None]:
    """The JSON's `ratios`: every goal's measured ratio, under a stable key."""
    keys = {
        "best disaggregated capacity / best colocated baseline": "capacity_disagg_vs_colocated",
        "auto TTFT p50 / colocated (vLLM's client, random 1,024/64)": "auto_ttft_p50_vs_colocated",
        "auto ITL p99 / colocated (vLLM's client, random 1,024/64)": "auto_itl_p99_vs_colocated",
        "1p1d TTFT p50 / colocated (vLLM's client, random 1,024/64)": "1p1d_ttft_p50_vs_colocated",
        "1p1d ITL p99 / colocated (vLLM's client, random 1,024/64)": "1p1d_itl_p99_vs_colocated",
        "multi-turn: auto TTFT p50 / always (1p1d)": "multi_turn_auto_ttft_p50_vs_always",
        "multi-turn: auto ITL p99 / always (1p1d)": "multi_turn_auto_itl_p99_vs_always",
        "short prompts: auto output tokens/s / colocated": "short_auto_throughput_vs_colocated",
    }
    found = {key: judged[name]["measured"] for name, key in keys.items() if name in judged}
    for name, system in systems.items():
        found[f"capacity_{name}_req_per_s"] = capacity(system)
        if _ok(system.get("vllm")) and _ok(system.get("crosscheck")):
            check = vllm_client.cross_check(system["crosscheck"], system["vllm"])
            for stat, row in check["stats"].items():
                found[f"crosscheck_{name}_{stat}_ours_vs_vllm"] = row["ratio"]
    return found


def quietness(run: Mapping[str, Any]) -> dict[str, Any]:
    """How much CPU other processes used during the measured runs, overall and per system."""
    per_system = {}
    every: list[float] = []
    for name, system in run["systems"].items():
        fractions = [
            r["host_load"]["foreign_fraction"]
            for r in _dig(system, "sweep", "runs") or []
            if "host_load" in r
        ]
        for key in ("vllm", "crosscheck", "multi_turn", "short"):
            value = _dig(system, key, "host_load", "foreign_fraction")
            if value is not None:
                fractions.append(value)
        every += fractions
        if fractions:
            per_system[name] = {
                "mean": float(np.mean(fractions)),
                "max": max(fractions),
                "runs": len(fractions),
            }
    return {
        "per_system": per_system,
        "mean": float(np.mean(every)) if every else None,
        "max": max(every) if every else None,
        "engine_lock": (run["manifest"] or {}).get("engine_lock"),
    }


# -- markdown -----------------------------------------------------------------------------


def _n(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | int):
        value = float(value)
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _spread(spread: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not spread or spread.get("mean") is None:
        return "–"
    return f"{_n(spread['mean'], digits)} [{_n(spread['min'], digits)}–{_n(spread['max'], digits)}]"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _verdict(goal: Mapping[str, Any]) -> str:
    if goal["met"] is None:
        return "not measured"
    return "**met**" if goal["met"] else "**missed**"


def goal_lines(judged: Mapping[str, Mapping[str, Any]]) -> list[str]:
    rows = [
        [
            name,
            goal["issue"],
            f"{goal['direction']} {_n(goal['target'])}",
            _n(goal["measured"]),
            _verdict(goal),
            goal["detail"],
        ]
        for name, goal in judged.items()
    ]
    return _table(["goal", "issue", "target", "measured", "verdict", "how"], rows)


def sweep_lines(systems: Mapping[str, Any]) -> list[str]:
    swept = {n: s["sweep"] for n, s in systems.items() if _ok(s.get("sweep"))}
    if not swept:
        return ["No system completed its sweep."]
    rates = sorted({p["rate"] for s in swept.values() for p in s["curve"]})

    def grid(key: str, digits: int = 3) -> list[str]:
        rows = []
        for rate in rates:
            row = [_n(rate)]
            for sweep in swept.values():
                point = next((p for p in sweep["curve"] if p["rate"] == rate), None)
                row.append(_spread(point[key], digits) if point else "–")
            rows.append(row)
        return _table(["req/s", *swept], rows)

    cap_rows = [
        [
            name,
            _spread(s["capacity"]["interpolated"]),
            _spread(s["capacity"]["tested"]),
            ", ".join(
                f"{seed}: {_n(v['interpolated'])}" for seed, v in s["capacity"]["per_seed"].items()
            ),
            ", ".join(s["capacity"]["bounds"]),
        ]
        for name, s in swept.items()
    ]
    return [
        "Highest request rate with at least 90% of requests meeting both SLOs (mean [min–max] "
        "over seeds; `interpolated`: where the attainment line crosses 90% between the last "
        "rate that met it and the first that did not; `tested`: the last rate of the sweep "
        "that met it; bound `at_least`: every rate met it, `below`: the lowest rate missed it):",
        "",
        *_table(["system", "interpolated req/s", "tested req/s", "per seed", "bounds"], cap_rows),
        "",
        "SLO attainment, both SLOs (share of sent requests; mean [min–max] over seeds):",
        "",
        *grid("attainment"),
        "",
        "TTFT SLO alone:",
        "",
        *grid("attainment_ttft"),
        "",
        "TPOT SLO alone:",
        "",
        *grid("attainment_tpot"),
        "",
        "ITL p99 (ms), reported beside the SLOs:",
        "",
        *grid("itl_p99_ms", 4),
        "",
        "TTFT p50 and p99 (ms):",
        "",
        *grid("ttft_p50_ms", 4),
        "",
        *grid("ttft_p99_ms", 4),
        "",
        "TPOT p50 (ms):",
        "",
        *grid("tpot_p50_ms", 3),
        "",
        "Output tokens/s:",
        "",
        *grid("output_tokens_per_s", 3),
    ]


def _by_kind(sweep: Mapping[str, Any], rate: float, kind: str, *path: str) -> float | None:
    values = [_dig(r, "by_kind", kind, *path) for r in sweep.get("runs", []) if r["rate"] == rate]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def light_load_lines(systems: Mapping[str, Any]) -> list[str]:
    """The latencies the SLOs are measured against: each system at the sweep's lightest rate."""
    lines = []
    for name, system in systems.items():
        sweep = system.get("sweep")
        if not _ok(sweep):
            continue
        rate = min(p["rate"] for p in sweep["curve"])
        point = next(p for p in sweep["curve"] if p["rate"] == rate)
        long_ttft = _by_kind(sweep, rate, "long", "ttft_ms", "p50")
        lines.append(
            f"  - {name} at {_n(rate)} req/s (the lightest load): long prompts' TTFT p50 "
            f"{_n(long_ttft, 4)} ms, TPOT p50 {_n(point['tpot_p50_ms']['mean'], 3)} ms"
        )
    return ["- Measured at light load, for scale:", *lines] if lines else []


def losses(systems: Mapping[str, Any]) -> list[str]:
    """Where a disaggregated system does worse than the better colocated baseline, from the
    numbers (every rate, TTFT tails, long prompts, throughput, the #16 runs)."""
    lines = []
    swept = {n: s["sweep"] for n, s in systems.items() if _ok(s.get("sweep"))}
    bases = [n for n in BASELINES if n in swept]
    for cand in (n for n in DISAGGREGATED if n in swept):
        for rate in [p["rate"] for p in swept[cand]["curve"]]:
            point = {
                n: next(p for p in swept[n]["curve"] if p["rate"] == rate) for n in [cand, *bases]
            }
            for key, label in (
                ("ttft_p50_ms", "TTFT p50"),
                ("ttft_p90_ms", "TTFT p90"),
                ("ttft_p99_ms", "TTFT p99"),
                ("tpot_p50_ms", "TPOT p50"),
                ("itl_p99_ms", "ITL p99"),
            ):
                ours = point[cand][key]["mean"]
                better = [
                    (point[b][key]["mean"], b) for b in bases if point[b][key]["mean"] is not None
                ]
                if ours is None or not better:
                    continue
                best, who = min(better)
                if ours > best * 1.05:
                    lines.append(
                        f"- {cand} at {_n(rate)} req/s: {label} {_n(ours, 4)} ms "
                        f"against {who}'s {_n(best, 4)} ms ({_n(ours / best)}x)"
                    )
            long_ttft = _by_kind(swept[cand], rate, "long", "ttft_ms", "p50")
            base_long = [(_by_kind(swept[b], rate, "long", "ttft_ms", "p50"), b) for b in bases]
            base_long = [(v, b) for v, b in base_long if v is not None]
            if long_ttft is not None and base_long and long_ttft > min(base_long)[0] * 1.05:
                best, who = min(base_long)
                lines.append(
                    f"- {cand} at {_n(rate)} req/s: long prompts' TTFT p50 "
                    f"{_n(long_ttft, 4)} ms against {who}'s {_n(best, 4)} ms"
                )
    return lines or [
        "- nowhere in this run (every disaggregated number within 5% of the "
        "better baseline or better)"
    ]


def crosscheck_lines(systems: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, system in systems.items():
        if not (_ok(system.get("vllm")) and _ok(system.get("crosscheck"))):
            continue
        check = vllm_client.cross_check(system["crosscheck"], system["vllm"])
        for stat, row in check["stats"].items():
            rows.append(
                [
                    name,
                    stat.replace("_", " "),
                    _n(row["ours_ms"], 4),
                    _n(row["vllm_ms"], 4),
                    _n(row["ratio"]),
                    "yes" if row["within"] else "**no**",
                ]
            )
    if not rows:
        return ["Not measured."]
    return _table(
        [
            "system",
            "statistic",
            "bench serve (ms)",
            "vLLM's client (ms)",
            "ours / vLLM",
            "within 15%",
        ],
        rows,
    )


def phase_lines(systems: Mapping[str, Any], key: str) -> list[str]:
    rows = []
    for name, system in systems.items():
        result = system.get(key)
        if not _ok(result):
            rows.append([name, "not run", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                _n(result["ttft_ms"]["p50"], 4),
                _n(result["ttft_ms"]["p99"], 4),
                _n(_dig(result, "tpot_ms", "p50"), 4),
                _n(result["itl_ms"]["p50"], 4),
                _n(result["itl_ms"]["p99"], 4),
                _n(result["output_tokens_per_s"], 4),
                f"{result['completed']} / {result['failed']}",
            ]
        )
    return _table(
        [
            "system",
            "TTFT p50",
            "TTFT p99",
            "TPOT p50",
            "ITL p50",
            "ITL p99",
            "output tok/s",
            "completed / failed",
        ],
        rows,
    )


def placement_lines(run: Mapping[str, Any]) -> list[str]:
    manifest = run["manifest"] or {}
    described = manifest.get("placements", {})
    rows = []
    for name, result in run["placement"].items():
        if not _ok(result):
            continue
        rows.append(
            [
                name,
                described.get(name, ""),
                _n(result["itl_ms"]["p50"], 4),
                _n(result["itl_ms"]["p99"], 4),
                _n(_dig(result, "tpot_ms", "p50"), 4),
                _n(result["ttft_ms"]["p50"], 4),
                f"{100 * result['host_load']['foreign_fraction']:.0f}%",
            ]
        )
    if not rows:
        return ["Not measured in this run."]
    return _table(
        [
            "placement",
            "where",
            "ITL p50 ms",
            "ITL p99 ms",
            "TPOT p50 ms",
            "TTFT p50 ms",
            "other CPU",
        ],
        rows,
    )


def quiet_lines(quiet: Mapping[str, Any]) -> list[str]:
    lock = quiet.get("engine_lock") or {}
    if lock.get("by_this_run"):
        held = "under the engine lock (`flock /tmp/splitwise-engine.lock`, held by this run): "
        held += "no other engine ran meanwhile"
    else:
        held = "**not** under the engine lock: other engines may have run meanwhile"
    lines = [f"- Measured {held}."]
    if quiet["mean"] is None:
        return lines
    busy = sum(1 for f in quiet["per_system"].values() if f["max"] > 0.05)
    verdict = (
        "otherwise idle."
        if quiet["max"] <= 0.05
        else "otherwise idle on average, with other work above 5% of it during some runs "
        f"(systems with such a run: {busy})."
        if quiet["mean"] <= 0.05
        else "**not** otherwise idle; numbers are noisier."
    )
    lines.append(
        f"- CPU used by other processes (not this run's load generator or systems) during the "
        f"measured runs: {100 * quiet['mean']:.1f}% of the machine on average, "
        f"{100 * quiet['max']:.1f}% in the busiest run: the machine was {verdict}"
    )
    for name, found in quiet["per_system"].items():
        lines.append(
            f"  - {name}: {100 * found['mean']:.1f}% mean, {100 * found['max']:.1f}% "
            f"max over {found['runs']} runs"
        )
    return lines


def markdown(
    run: Mapping[str, Any],
    judged: Mapping[str, Any],
    facts: Mapping[str, Any],
    plot_names: Sequence[str],
) -> str:
    manifest = run["manifest"] or {}
    settings = manifest.get("settings", {})
    systems = run["systems"]
    slo = {"ttft": settings.get("slo_ttft_ms", 0), "tpot": settings.get("slo_tpot_ms", 0)}
    minutes = sum((s["entry"].get("minutes") or 0) for s in systems.values())
    out = [
        "# The Splitwise experiment on the CPU: colocated, data parallel, 1P1D, auto",
        "",
        f"Written by `scripts/splitwise_experiment.sh` (run started {manifest.get('started')}, "
        f"finished {manifest.get('finished', '–')}, {minutes:.0f} min; planned arrivals "
        f"{manifest.get('planned_minutes')} min). Every system got the same requests (the same "
        "prompts, lengths and Poisson arrival times, from the same seeds), through the same "
        "proxy, from the same load generator, one system at a time.",
        "",
        "## Machine, and how quiet it was",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        *quiet_lines(quietness(run)),
        "",
        "## Systems, and where their processes ran",
        "",
        *[
            f"- **{name}**: {s['entry'].get('description', s['entry'].get('error', ''))}"
            for name, s in systems.items()
        ],
        f"- Placement (the same for every system): {_dig(manifest, 'placement', 'describe')}.",
        "",
        "## SLOs",
        "",
        f"- {SLO_REASON.format(**slo)}",
        *light_load_lines(systems),
        "- A failed request meets neither SLO. ITL p99 (the gaps between streamed chunks) is "
        "reported beside them, not used as an SLO.",
        "",
        "## Goals",
        "",
        *goal_lines(judged),
        "",
        "## Rate sweep: the mixed workload",
        "",
        f"Workload: `{settings.get('sweep_flags')}`, {settings.get('sweep_requests')} requests "
        f"per run, rates {settings.get('rates')} req/s, seeds {settings.get('seeds')}.",
        "",
        *sweep_lines(systems),
        "",
        "## Where disaggregation loses",
        "",
        *losses(systems),
        "",
        "## vLLM's own client beside ours",
        "",
        f"`vllm bench serve` (vllm.benchmarks.serve, called from Python), random dataset, "
        f"{settings.get('vllm_input_len')} in / {settings.get('vllm_output_len')} out, "
        f"{settings.get('vllm_rate')} req/s, {settings.get('vllm_requests')} requests, seed "
        f"{settings.get('vllm_seed')}, against each system's proxy; then `bench serve` with "
        "the same shape, rate and request count (its own prompts and arrival times):",
        "",
        *phase_lines(systems, "vllm"),
        "",
        *crosscheck_lines(systems),
        "",
        "## Multi-turn chat (each turn resends its conversation's history)",
        "",
        *phase_lines(systems, "multi_turn"),
        "",
        "## Short prompts (closed loop: throughput)",
        "",
        *phase_lines(systems, "short"),
        "",
        "## Where the load generator and proxy run (the colocated ITL of the first report)",
        "",
        *placement_lines(run),
    ]
    for name, system in systems.items():
        if "error" in system["entry"]:
            out += ["", f"## {name}: did not run", "", system["entry"]["error"]]
            for log, tail in (system.get("log_tail") or {}).items():
                out += ["", f"`{log}`:", "", "```", *tail, "```"]
    if plot_names:
        out += ["", "## Plots", "", *[f"![{n}]({n})" for n in plot_names]]
    return "\n".join(out) + "\n"


# -- files ----------------------------------------------------------------------------------


def _cdf_runs(systems: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system, the requests of every seed at the sweep's CDF rate, pooled."""
    pooled = {}
    for name, system in systems.items():
        sweep = system.get("sweep")
        if not _ok(sweep):
            continue
        records = [
            rec
            for r in sweep["runs"]
            if r["rate"] == sweep["cdf_rate"]
            for rec in r.get("per_request", [])
        ]
        if records:
            pooled[name] = {"per_request": records}
    return pooled


def _first_seed_runs(systems: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for name, system in systems.items():
        sweep = system.get("sweep")
        if _ok(sweep):
            at = [r for r in sweep["runs"] if r["rate"] == sweep["cdf_rate"] and "per_request" in r]
            if at:
                found[name] = at[0]
    return found


def _strip(value: Any) -> Any:
    """A result without per-request records (the JSON stays small; the run folder has them)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "per_request"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def write_report(run_dir: Path, out: Path) -> list[Path]:
    """Writes `<out>.md`, `<out>.json` and the plots beside them; returns their paths."""
    run = load_run(run_dir)
    judged = goals(run["systems"])
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = []
    swept = {n: s["sweep"] for n, s in run["systems"].items() if _ok(s.get("sweep"))}
    if swept:
        pngs.append(plots.plot_attainment(swept, out.parent / f"{out.name}-{plots.ATTAINMENT}"))
        cdf = _cdf_runs(run["systems"])
        if cdf:
            pngs.append(
                plots.plot_latency_cdfs(cdf, out.parent / f"{out.name}-{plots.LATENCY_CDF}")
            )
        timeline = _first_seed_runs(run["systems"])
        if timeline:
            pngs.append(
                plots.plot_itl_over_time(timeline, out.parent / f"{out.name}-{plots.ITL_OVER_TIME}")
            )
    facts = report.machine()
    md = out.parent / f"{out.name}.md"
    md.write_text(markdown(run, judged, facts, [p.name for p in pngs]))
    payload = {
        "run_dir": str(run_dir),
        "manifest": run["manifest"],
        "quietness": quietness(run),
        "goals": judged,
        "ratios": ratios(run["systems"], judged),
        "systems": _strip(run["systems"]),
        "placement_study": _strip(run["placement"]),
    }
    report.write_json(out.parent / f"{out.name}.json", payload)
    return [md, *pngs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the experiment's folder")
    parser.add_argument("--out", type=Path, required=True, help="path without extension")
    args = parser.parse_args(argv)
    for path in write_report(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
