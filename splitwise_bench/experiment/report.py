"""The experiment's report, written from a run folder alone: `<out>.md`, `<out>.json`, plots.

The JSON holds the summary (verdicts.py) with the command, commit and machine that
`bench.report.write_json` records; the markdown shows the same numbers. Text below the
HAND_WRITTEN marker of an existing report is kept when it is rewritten: the reading of the
numbers, written from them by hand.

    python -m splitwise_bench.experiment.report --run-dir runs/experiment-X \\
        --out docs/benchmarks/splitwise-traces
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from splitwise_bench import report
from splitwise_bench.experiment import analysis, plots, verdicts
from splitwise_bench.experiment import plan as plans

HAND_WRITTEN = "<!-- Below: the reading of these numbers, by hand; kept when this is rewritten. -->"


def _n(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _s(found: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not found or found.get("mean") is None:
        return "–"
    if found["min"] == found["max"]:
        return _n(found["mean"], digits)
    return f"{_n(found['mean'], digits)} [{_n(found['min'], digits)}–{_n(found['max'], digits)}]"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def goal_lines(judged: Mapping[str, Any]) -> list[str]:
    rows = []
    for goal in judged.values():
        verdict = {None: "not measured", True: "**met**", False: "**missed**"}[goal["met"]]
        target = f"{goal['direction']} {_n(goal['target'])}"
        rows.append([goal["text"], target, _n(goal["measured"]), verdict, goal["detail"]])
    return _table(["goal", "target", "measured", "verdict", "how"], rows)


def quiet_lines(quiet: Mapping[str, Any]) -> list[str]:
    lock = quiet.get("engine_lock") or {}
    held = (
        "under the engine lock (`flock /tmp/splitwise-engine.lock`, held by this run for all of "
        "it): no other engine ran meanwhile"
        if lock.get("by_this_run")
        else "**not** under the engine lock: other engines may have run meanwhile"
    )
    lines = [f"- Measured {held}."]
    if quiet["mean"] is None:
        return lines
    lines.append(
        f"- CPU used by other processes (not this run's load generator or systems) during the "
        f"{quiet['runs']} measured runs: {100 * quiet['mean']:.1f}% of the machine on average, "
        f"{100 * quiet['max']:.1f}% in the busiest; {quiet['quiet_before']} runs began after a "
        "quiet window (others under 5% for 3 s), the rest after waiting the plan's longest wait."
    )
    for name, found in quiet["per_system"].items():
        lines.append(
            f"  - {name}: {100 * found['mean']:.1f}% mean, {100 * found['max']:.1f}% max over "
            f"{found['runs']} runs"
        )
    return lines


def family_lines(goals: plans.Goals) -> list[str]:
    lines = []
    for family in goals.families.values():
        lines += [f"- **{family.title}**: {family.describe()}. {family.why}"]
    lines.append(
        f"- Capacity: the highest offered rate at which at least {goals.attainment_goal:.0%} of "
        "requests meet the family (interpolated between the rates around it), per window. "
        "Goodput: requests per second meeting it. A failed request meets nothing."
    )
    return lines


def azure_lines(azure: Mapping[str, Any], goals: plans.Goals) -> list[str]:
    shown = {n: a for n, a in azure.items() if a}
    if not shown:
        return ["No system completed an Azure run."]
    rates = sorted({p["rate"] for a in shown.values() for p in a["curve"]})

    def grid(pick) -> list[str]:
        rows = []
        for rate in rates:
            row = [_n(rate)]
            for found in shown.values():
                point = next((p for p in found["curve"] if p["rate"] == rate), None)
                row.append(_s(pick(point)) if point else "–")
            rows.append(row)
        return _table(["offered req/s", *shown], rows)

    out: list[str] = []
    for name, family in goals.families.items():
        caps = []
        for n, a in shown.items():
            found = a["families"][name]
            peak = f"{_s(found['peak_goodput'])} at {_n(found['peak_goodput']['rate'])}"
            caps.append([n, _s(found["capacity"]), peak])
        out += [f"### {family.title} ({family.describe()})", ""]
        out += _table(["system", "capacity req/s", "peak goodput req/s (at offered req/s)"], caps)
        out += ["", "Attainment:", "", *grid(lambda p, f=name: p[f]["attainment"]), ""]
        out += ["Goodput (req/s):", "", *grid(lambda p, f=name: p[f]["goodput"]), ""]
    for key, title in (
        ("ttft_p50_ms", "TTFT p50 (ms)"),
        ("ttft_p99_ms", "TTFT p99 (ms)"),
        ("itl_p99_ms", "ITL p99 (ms, all gaps pooled)"),
        ("tpot_p50_ms", "TPOT p50 (ms)"),
    ):
        out += [f"{title}:", "", *grid(lambda p, k=key: p[k]), ""]
    return out


def mooncake_lines(mooncake: Mapping[str, Any]) -> list[str]:
    rows = []
    for name, found in mooncake.items():
        if not found:
            continue
        rows.append(
            [
                name,
                _s(found["ttft_p50_ms"], 4),
                _s(found["ttft_p99_ms"], 4),
                _s(found["compute_avoided"]),
                _s(found["store_hit_ratio"]),
                _s(found["ideal"]),
                _s(found["ideal_at_store"]),
                _s(found["ideal_at_engine_cache"]),
            ]
        )
    if not rows:
        return ["No system completed a Mooncake run."]
    headers = [
        "system",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "prompt tokens not computed",
        "store hit ratio",
        "ideal",
        "ideal at the store's capacity",
        "ideal at one engine's KV cache",
    ]
    return [*_table(headers, rows), "", *token_lines(mooncake)]


def token_lines(mooncake: Mapping[str, Any]) -> list[str]:
    """Per system and seed where the prompt tokens came from, and what the store lacked."""
    rows = []
    for name, found in mooncake.items():
        for seed in (found or {}).get("per_seed", []):
            t = seed["tokens"]
            counts = [_n(t[k]) for k in (*analysis.SOURCES, "saved_tokens")]
            counts.append(f"{t['save_failures']:.0f} / {t['save_dropped']:.0f}")
            rows.append([name, str(seed["seed"]), _n(seed["prompt_tokens_sent"]), *counts])
    headers = [
        "system",
        "seed",
        "prompt tokens sent",
        "computed",
        "engine's prefix cache",
        "loaded from the store",
        "saved to the store",
        "chunks not saved: failed / dropped",
    ]
    return [
        "Where each prompt token came from (the engines' `vllm:prompt_tokens_by_source`, summed "
        "over the system's engines; a decode engine counts what it loaded from the store as "
        "external) and the tokens the connectors saved because the store lacked them (a chunk "
        "that failed or was dropped is not saved: the hit ratio is then an upper bound):",
        "",
        *_table(headers, rows),
    ]


def admission_lines(admission: Mapping[str, Any] | None) -> list[str]:
    if not admission:
        return ["Not run."]
    capacity = admission.get("capacity") or {}
    lines = [
        f"- System: {admission.get('description') or admission.get('error')}",
        f"- Measured capacity the loads multiply: {_n(capacity.get('req_per_s'))} req/s "
        f"({capacity.get('how')}).",
        "",
    ]
    rows = [
        [
            _n(p["load"]),
            _n(p.get("rate")),
            str(p.get("sent", "–")),
            str(p.get("admitted", "–")),
            str(p.get("refused", "–")),
            str(p.get("failed", "–")),
            str(p.get("timed_out", "–")),
            _n(p.get("admitted_ttft_p50_ms"), 4),
            _n(p.get("admitted_ttft_p99_ms"), 4),
            _s(p.get("refusal_ms"), 3),
            p.get("error", ""),
        ]
        for p in admission["points"]
    ]
    headers = [
        "load (x capacity)",
        "offered req/s",
        "sent",
        "admitted",
        "refused",
        "failed",
        "timed out",
        "admitted TTFT p50 ms",
        "admitted TTFT p99 ms",
        "refusal latency ms",
        "error",
    ]
    return lines + _table(headers, rows)


def _trace_lines(runs: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any]) -> list[str]:
    """What the replays sent: the trace's shape beside the replay's, and each run's scales."""
    done = [r for r in runs if "trace" in r["result"]]
    if not done:
        return []
    trace = done[0]["result"]["trace"]
    shape = trace["shape"]
    clipped = sorted({r["result"]["trace"]["clipped"]["prompts"] for r in done})
    lines = [
        f"- Trace: {trace['source']} (`{trace['file']}`); length scale {trace['length_scale']:g}"
        f", prompts cut to the model's {trace['max_model_len']:,} tokens beside their output "
        f"(clipped prompts per run: {clipped}).",
    ]
    for what in ("prompt_tokens", "output_tokens"):
        t, r = shape[what]["trace"], shape[what]["replay"]
        lines.append(
            f"- {what.replace('_', ' ')} (first run's window), p10/p50/p90/p99: trace "
            f"{'/'.join(_n(t[f'p{q}']) for q in (10, 50, 90, 99))}, replayed "
            f"{'/'.join(_n(r[f'p{q}']) for q in (10, 50, 90, 99))}"
        )
    cv = shape["interarrival_cv"]
    lines.append(
        f"- Burstiness (CV of the gaps): trace {_n(cv['trace'])}, replay {_n(cv['replay'])}"
    )
    scales = sorted(
        {(m["start_s"], m["seed"], m["rate"], m["time_scale"]) for m in (r["meta"] for r in runs)}
    )
    lines.append(
        "- Runs (trace start s, seed, offered req/s: time scale): "
        + "; ".join(f"{s:g}, {seed}, {rate:g}: {scale:.3g}" for s, seed, rate, scale in scales)
    )
    return lines


def answer_lines(summary: Mapping[str, Any], goals: plans.Goals) -> list[str]:
    """The questions the experiment asks, answered from the numbers."""
    lines = []
    for name, family in goals.families.items():
        peaks = {n: a["families"][name]["peak_goodput"] for n, a in summary["azure"].items() if a}
        peaks = {n: p for n, p in peaks.items() if p["mean"] is not None}
        if peaks:
            order = sorted(peaks, key=lambda n: -peaks[n]["mean"])
            lines.append(
                f"- Azure conversation, {family.title}: peak goodput "
                + ", ".join(f"{n} {_s(peaks[n])} req/s" for n in order)
                + f": **{order[0]}** serves the most requests within this SLO."
            )
    moon = {n: m for n, m in summary["mooncake"].items() if m}
    if moon:
        lines.append(
            "- Mooncake conversation, TTFT p50: "
            + ", ".join(f"{n} {_s(m['ttft_p50_ms'], 4)} ms" for n, m in moon.items())
            + "; prompt tokens not computed: "
            + ", ".join(f"{n} {_s(m['compute_avoided'])}" for n, m in moon.items())
            + f" (ideal {_s(next(iter(moon.values()))['ideal'])})."
        )
    for goal in summary["goals"].values():
        if goal["measure"] == "admitted_ttft_p99_vs_slo":
            lines.append(f"- Admission: {goal['detail']}.")
    return lines


def head_lines(
    run: Mapping[str, Any], summary: Mapping[str, Any], goals: plans.Goals, facts: Mapping[str, Any]
) -> list[str]:
    """The title, the answers, the goals, the machine, the systems and the SLO families."""
    manifest, systems = run["manifest"], run["systems"]
    minutes = sum(s["entry"].get("minutes") or 0 for s in systems.values())
    return [
        "# The Splitwise experiment on public traces: colocated, dp, 1P1D, auto",
        "",
        f"Written by `bash scripts/splitwise_experiment.sh` ({manifest.get('mode')} plan of "
        "`splitwise_bench/experiment/goals.yaml`; started "
        f"{manifest.get('started')}, finished {manifest.get('finished', '–')}, {minutes:.0f} min). "
        "Every system got the same requests at the same times, through the same proxy, from the "
        "same load generator (`bench serve --trace`), one system after another on the same cores. "
        "Every number here is in the JSON beside this file.",
        "",
        "## Answers",
        "",
        *answer_lines(summary, goals),
        "",
        "## Goals",
        "",
        *goal_lines(summary["goals"]),
        "",
        "## Machine, and how quiet it was",
        "",
        *[f"- {k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in facts.items()],
        *quiet_lines(summary["quietness"]),
        "",
        "## Systems",
        "",
        *[
            f"- **{n}**: {s['entry'].get('description') or s['entry'].get('error', '')}"
            for n, s in systems.items()
        ],
        f"- Store and connectors: {goals.plan.store}; each engine's KV cache "
        f"{goals.plan.engine_kv_cache_gb:g} GiB.",
        "",
        "## SLO families (fixed before the run, in goals.yaml)",
        "",
        *family_lines(goals),
        "",
    ]


def markdown(
    run: Mapping[str, Any],
    summary: Mapping[str, Any],
    goals: plans.Goals,
    facts: Mapping[str, Any],
    pngs: Sequence[str],
) -> str:
    manifest, systems = run["manifest"], run["systems"]
    moon = goals.plan.mooncake
    out = [
        *head_lines(run, summary, goals, facts),
        "## Azure conversation trace (Splitwise's workload)",
        "",
        *_trace_lines([r for s in systems.values() for r in s["azure"]], manifest),
        "",
        *azure_lines(summary["azure"], goals),
        "## Mooncake conversation trace: the store against the engine's prefix cache",
        "",
        f"- {moon.requests} requests of the first {moon.duration_s:g} trace seconds, keeping "
        f"{moon.sessions:.0%} of its conversations (seeds {list(moon.windows)}: which ones, and "
        f"their tokens), offered at {moon.rate:g} req/s.",
        *_trace_lines([r for s in systems.values() for r in s["mooncake"]], manifest),
        "- The store's hit ratio: the share of prompt tokens the store already held when the "
        "connectors went to save them (1 - saved / sent): what a prefix cache of the store's "
        "size would have served. Ideal: the share of prompt tokens whose whole prefix an "
        "earlier prompt sent (under an LRU of the given capacity where named).",
        "",
        *mooncake_lines(summary["mooncake"]),
        "",
        "## Admission control at 1x to 3x measured capacity",
        "",
        *admission_lines(summary["admission"]),
    ]
    for name, system in systems.items():
        if "error" in system["entry"]:
            out += ["", f"## {name}: did not run", "", system["entry"]["error"]]
            for log, tail in (system.get("log_tail") or {}).items():
                out += ["", f"`{log}`:", "", "```", *tail, "```"]
    if pngs:
        out += ["", "## Plots", "", *[f"![{n}]({n})" for n in pngs]]
    return "\n".join(out) + "\n"


def _pooled(systems: Mapping[str, Any], phase: str, rate: float | None) -> dict[str, list]:
    found = {}
    for name, system in systems.items():
        records = [
            rec
            for r in system.get(phase, [])
            if analysis._ok(r["result"]) and (rate is None or r["meta"]["rate"] == rate)
            for rec in r["result"]["per_request"]
        ]
        if records:
            found[name] = records
    return found


def write_plots(
    run: Mapping[str, Any], summary: Mapping[str, Any], goals: plans.Goals, out: Path
) -> list[Path]:
    stem = out.parent / out.name
    pngs = []
    if any(summary["azure"].values()):
        pngs.append(
            plots.plot_attainment(
                summary["azure"],
                goals.families,
                Path(f"{stem}-{plots.ATTAINMENT}"),
                goals.attainment_goal,
            )
        )
    systems = {n: s for n, s in run["systems"].items() if n != "admission"}
    pooled = {
        f"Azure conversation at {goals.plan.azure.cdf_rate:g} req/s": _pooled(
            systems, "azure", goals.plan.azure.cdf_rate
        ),
        "Mooncake conversation": _pooled(systems, "mooncake", None),
    }
    pooled = {k: v for k, v in pooled.items() if v}
    if pooled:
        pngs.append(plots.plot_cdfs(pooled, Path(f"{stem}-{plots.CDFS}")))
    if any(summary["mooncake"].values()):
        pngs.append(plots.plot_hit_ratio(summary["mooncake"], Path(f"{stem}-{plots.HIT_RATIO}")))
    points = (summary["admission"] or {}).get("points") or []
    if any("error" not in p for p in points):
        slo = goals.families["ttft_bound"].ttft_ms
        pngs.append(plots.plot_admission(points, slo, Path(f"{stem}-{plots.ADMISSION}")))
    return pngs


def write_report(run_dir: Path, out: Path, goals: plans.Goals) -> list[Path]:
    """Writes `<out>.md`, `<out>.json` and the plots beside them; returns their paths."""
    run = analysis.load_run(run_dir)
    summary = verdicts.summarize(run, goals)
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = write_plots(run, summary, goals, out)
    md = out.parent / f"{out.name}.md"
    kept = md.read_text().partition(HAND_WRITTEN)[2] if md.exists() else ""
    text = markdown(run, summary, goals, report.machine(), [p.name for p in pngs])
    md.write_text(text + (f"\n{HAND_WRITTEN}{kept}" if kept else ""))
    payload = {
        "run_dir": str(run_dir),
        "manifest": run["manifest"],
        "goals_file": goals.raw,
        **summary,
    }
    report.write_json(out.parent / f"{out.name}.json", payload)
    return [md, *pngs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="the experiment's folder")
    parser.add_argument("--out", type=Path, required=True, help="path without extension")
    args = parser.parse_args(argv)
    mode = analysis.read_json(args.run_dir / "manifest.json").get("mode", "full")
    for path in write_report(args.run_dir, args.out, plans.load(mode)):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
