"""`python -m splitwise_bench.experiment`: the whole experiment, then its report."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from splitwise_bench.experiment import plan, report
from splitwise_bench.experiment.run import Experiment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splitwise_bench.experiment")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("docs/benchmarks/splitwise-traces"),
        help="report path without extension (md, json and plots beside it)",
    )
    parser.add_argument("--run-dir", type=Path, help="raw results and logs (runs/experiment-*)")
    parser.add_argument("--short", action="store_true", help="the short plan (CI, fake engines)")
    parser.add_argument("--systems", help=f"comma-separated subset of {','.join(plan.SYSTEMS)}")
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for every child")
    args = parser.parse_args(argv)
    goals = plan.load("short" if args.short else "full")
    systems = goals.plan.systems
    if args.systems:
        systems = tuple(s for s in args.systems.split(",") if s)
        if unknown := sorted(set(systems) - set(plan.SYSTEMS)):
            parser.error(f"unknown systems {unknown}; choose from {plan.SYSTEMS}")
    run_dir = args.run_dir or Path("runs") / f"experiment-{datetime.now():%Y%m%d-%H%M%S}"
    print(f"[experiment] run folder {run_dir}", flush=True)
    status = Experiment(goals, run_dir, args.python, args.model, systems).run()
    for path in report.write_report(run_dir, args.out, goals):
        print(f"wrote {path}")
    return status


sys.exit(main())
