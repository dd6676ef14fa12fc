"""`bench sweep`: one system's SLO attainment across request rates and seeds, as DistServe does.

DistServe and Splitwise judge a serving system by the highest request rate at which it still
serves at least 90% of requests within both latency SLOs (TTFT, and TPOT: the mean time per
output token after the first), not by latency at one rate. This runs `bench serve` (the same
load generator, in this process) at each rate of a list, with several seeds per rate, against
one server, and reports per rate the attainment across seeds and, per seed, the highest rate
that met the goal; the spread across seeds says how much of a difference between two systems
is noise.

Each (seed, rate) run draws its own prompts (workload seed `seed * 100000 + rate * 1000`), so no
run finds the previous one's KV in a cache; two systems swept with the same seeds and rates see
exactly the same requests at the same times. The server is warmed up once before the first run.
Every run records the CPU other processes used meanwhile; with `--quiet-wait S` each run first
waits up to S seconds for the machine to be quiet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from splitwise_bench import host_load, report, serve
from splitwise_bench.workloads import WorkloadError
from splitwise_local.models.checkpoint import ModelError

ATTAINMENT_GOAL = 0.9
SEED_STRIDE = 100_000


def rate_list(text: str) -> list[float]:
    rates = sorted({float(part) for part in text.split(",") if part.strip()})
    if not rates or rates[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive rates like 0.5,1,2; got {text!r}")
    return rates


def seed_list(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds like 0,1,2; got {text!r}")
    return seeds


def workload_seed(seed: int, rate: float) -> int:
    """The prompts' seed of one run: distinct per (seed, rate), the same for every system."""
    return seed * SEED_STRIDE + round(rate * 1000)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    serve.add_common_arguments(parser)
    parser.add_argument(
        "--rates", type=rate_list, required=True, help="request rates (req/s), e.g. 0.5,1,2,3,4"
    )
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="e.g. 0,1,2")
    parser.add_argument(
        "--cdf-rate",
        type=float,
        help="keep every request's record at this rate (for CDF plots; default: the middle rate)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run, wait up to S seconds for other processes to leave the CPU",
    )


def sustained_rate(points: Sequence[tuple[float, float]], goal: float = ATTAINMENT_GOAL):
    """The highest rate meeting `goal` before the first rate that misses it.

    `points` are (rate, attainment) in rising rate order. Returns `tested` (the highest such
    rate of the sweep), `interpolated` (where the attainment line crosses the goal between the
    last rate that met it and the first that did not) and `bound`: "exact", "at_least" (every
    rate met it: the answer is beyond the sweep) or "below" (the lowest rate missed it)."""
    last_pass: tuple[float, float] | None = None
    for rate, value in points:
        if value >= goal:
            last_pass = (rate, value)
            continue
        if last_pass is None:
            return {"tested": None, "interpolated": None, "bound": "below"}
        (r0, a0), (r1, a1) = last_pass, (rate, value)
        crossing = r0 + (a0 - goal) / (a0 - a1) * (r1 - r0)
        return {"tested": r0, "interpolated": crossing, "bound": "exact"}
    if last_pass is None:
        return {"tested": None, "interpolated": None, "bound": "below"}
    return {"tested": last_pass[0], "interpolated": last_pass[0], "bound": "at_least"}


def _spread(values: Sequence[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(np.mean(known)), "min": min(known), "max": max(known)}


def _dig(run: Mapping[str, Any], *path: str) -> Any:
    value: Any = run
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


# Per rate: which numbers of each run are summarised across seeds.
CURVE_FIELDS: dict[str, tuple[str, ...]] = {
    "attainment": ("attainment", "both"),
    "attainment_ttft": ("attainment", "ttft"),
    "attainment_tpot": ("attainment", "tpot"),
    "ttft_p50_ms": ("ttft_ms", "p50"),
    "ttft_p90_ms": ("ttft_ms", "p90"),
    "ttft_p99_ms": ("ttft_ms", "p99"),
    "tpot_p50_ms": ("tpot_ms", "p50"),
    "tpot_p90_ms": ("tpot_ms", "p90"),
    "itl_p50_ms": ("itl_ms", "p50"),
    "itl_p99_ms": ("itl_ms", "p99"),
    "e2e_p50_ms": ("e2e_ms", "p50"),
    "goodput_requests_per_s": ("goodput_requests_per_s",),
    "output_tokens_per_s": ("output_tokens_per_s",),
    "failed": ("failed",),
    "foreign_fraction": ("host_load", "foreign_fraction"),
}


def curve(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per rate: every CURVE_FIELDS number as mean/min/max across seeds (and per seed)."""
    rates = sorted({run["rate"] for run in runs})
    points = []
    for rate in rates:
        at_rate = sorted((r for r in runs if r["rate"] == rate), key=lambda r: r["seed"])
        point: dict[str, Any] = {"rate": rate, "seeds": [r["seed"] for r in at_rate]}
        for name, path in CURVE_FIELDS.items():
            values = [_dig(r, *path) for r in at_rate]
            point[name] = {**_spread(values), "per_seed": values}
        points.append(point)
    return points


def capacity(runs: Sequence[Mapping[str, Any]], goal: float = ATTAINMENT_GOAL) -> dict[str, Any]:
    """Per seed the sustained rate at `goal` attainment (both SLOs), and its spread.

    In the spread a seed whose lowest rate already missed counts as 0 and one that met the goal
    at every rate counts as the highest rate: `bounds` says which seeds those were."""
    per_seed: dict[str, dict[str, Any]] = {}
    for seed in sorted({run["seed"] for run in runs}):
        mine = sorted((r for r in runs if r["seed"] == seed), key=lambda r: r["rate"])
        per_seed[str(seed)] = sustained_rate([(r["rate"], r["attainment"]["both"]) for r in mine])

    def value(found: Mapping[str, Any], key: str) -> float:
        return 0.0 if found[key] is None else float(found[key])

    return {
        "goal": goal,
        "per_seed": per_seed,
        "interpolated": _spread([value(f, "interpolated") for f in per_seed.values()]),
        "tested": _spread([value(f, "tested") for f in per_seed.values()]),
        "bounds": sorted({f["bound"] for f in per_seed.values()}),
    }


def plan_runs(args: argparse.Namespace, target: serve.Target) -> list[tuple]:
    """Every (seed, rate) run planned before the first is sent: (seed, rate, its arguments, its
    plan); the warm-up, if any, is sent here, once."""
    plans = []
    for seed in args.seeds:
        for rate in args.rates:
            run_args = argparse.Namespace(**{**vars(args), "rate": rate, "concurrency": 1})
            run_args.seed, run_args.warmup = workload_seed(seed, rate), 0
            plans.append((seed, rate, run_args, serve.plan_run(run_args, target)))
    if args.warmup:  # once, before the first run
        warm_args = argparse.Namespace(**{**vars(args), "rate": None, "concurrency": 1})
        warm_args.seed = workload_seed(args.seeds[0], 0)
        serve.warm_up(serve.plan_run(warm_args, target), warm_args)
    return plans


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    """Runs every (seed, rate) and returns the sweep's results (raises WorkloadError and the
    others `bench serve` raises, before the first measured request where it can)."""
    target = serve.connect(args)
    cdf_rate = args.cdf_rate if args.cdf_rate is not None else args.rates[len(args.rates) // 2]
    if cdf_rate not in args.rates:
        raise WorkloadError(f"--cdf-rate {cdf_rate} is not one of the rates {args.rates}")
    plans = plan_runs(args, target)
    roots = serve.host_roots(target.base_url, args.ours_pid)
    planned_s = sum(plan.arrivals[-1] for *_, plan in plans if plan.arrivals)
    print(f"bench sweep: {len(plans)} runs, {planned_s / 60:.1f} min of arrivals", flush=True)
    runs = []
    for seed, rate, run_args, plan in plans:
        quiet = host_load.wait_for_quiet(roots, args.quiet_wait) if args.quiet_wait else None
        result = serve.measure(plan, run_args)
        if rate != cdf_rate:
            result.pop("per_request")
        runs.append({"rate": rate, "seed": seed, "workload_seed": run_args.seed,
                     "quiet_wait": quiet, **result})  # fmt: skip
        print(
            f"  rate {rate:g}/s seed {seed}: attainment {result['attainment']['both']:.2f}, "
            f"TTFT p50 {result['ttft_ms']['p50'] or 0:,.0f} ms, ITL p99 "
            f"{result['itl_ms']['p99'] or 0:,.0f} ms, other CPU "
            f"{100 * result['host_load']['foreign_fraction']:.0f}%",
            flush=True,
        )
    settings = {k: v for k, v in runs[0]["settings"].items() if k not in ("seed", "rate")}
    foreign = [r["host_load"]["foreign_fraction"] for r in runs]
    return {
        "label": args.label,
        "url": target.base_url,
        "model": target.model,
        "settings": settings,
        "rates": list(args.rates),
        "seeds": list(args.seeds),
        "cdf_rate": cdf_rate,
        "runs": runs,
        "curve": curve(runs),
        "capacity": capacity(runs),
        "host_load": {
            "max_foreign_fraction": max(foreign),
            "mean_foreign_fraction": float(np.mean(foreign)),
            "quiet_runs": sum(r["host_load"]["quiet"] for r in runs),
            "runs": len(runs),
        },
    }


def _fmt(spread: Mapping[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if spread["mean"] is None:
        return "–"
    mean, low, high = (spread[k] * scale for k in ("mean", "min", "max"))
    return f"{mean:.{digits}f} [{low:.{digits}f}–{high:.{digits}f}]"


def print_results(results: Mapping[str, Any]) -> None:
    rows = [
        [
            point["rate"],
            _fmt(point["attainment"]),
            _fmt(point["ttft_p50_ms"], digits=0),
            _fmt(point["tpot_p50_ms"], digits=1),
            _fmt(point["itl_p99_ms"], digits=0),
            _fmt(point["foreign_fraction"], 100, 0),
        ]
        for point in results["curve"]
    ]
    report.print_table(
        f"bench sweep: {results['label']} (mean [min–max] over seeds {results['seeds']})",
        ["req/s", "attainment", "TTFT p50 ms", "TPOT p50 ms", "ITL p99 ms", "other CPU %"],
        rows,
    )
    cap = results["capacity"]
    print(
        f"\nhighest rate with >= {cap['goal']:.0%} attainment: "
        f"{_fmt(cap['interpolated'])} req/s (interpolated), {_fmt(cap['tested'])} (tested); "
        f"bounds {cap['bounds']}"
    )


def run(args: argparse.Namespace) -> int:
    try:
        results = sweep(args)
    except (WorkloadError, serve.ServerError, ModelError, serve.WarmupFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_results(results)
    report.write_json(args.json, results)
    bad = [r for r in results["runs"] if serve.verdict(r)]
    return 1 if bad else 0
