"""`bench routing`: what sending a prompt straight to decode costs against disaggregating it.

The numbers behind `--disagg auto`'s threshold. One run starts our store, a prefill engine
(kv_producer) and a decode engine (kv_both, as the launcher runs it under auto), one core each,
prefix caching off. For each uncached prompt length n it measures, on fresh random prompts:
- TTFT direct: the decode engine computes the n tokens itself;
- TTFT disaggregated: the prefill engine computes them (max_tokens=1), then the decode engine
  loads them from the store and computes the last token (the proxy's hop costs ~2 ms more);
- the stall each path puts on a stream the decode engine is generating meanwhile: that
  stream's longest gap between tokens while the request is served (median over the repeats),
  against the stream's median gap before it (ITL p50).

Direct is the better path for a length while its TTFT is no worse and its stall stays within the
ITL budget; the JSON's `ratios` hold TTFT direct/disaggregated and stall/ITL per length.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from splitwise_bench.report import print_table, write_json
from splitwise_bench.stall import Stream
from splitwise_local.config import SplitwiseConfig
from splitwise_local.models.hub import resolve_model
from splitwise_local.progress import Progress
from splitwise_testing.system import Engine, start_system

LENGTHS = (32, 64, 128, 256, 512, 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model).folder
    rng = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(1000, 40000) for _ in range(n)]

    root = Path(tempfile.mkdtemp(prefix="splitwise-bench-routing-"))
    print(f"starting store, prefill and decode (kv_both) engines (logs in {root}) ...")
    roles = {"prefill": "prefill", "decode": "both"}
    system = start_system(root, model, SplitwiseConfig(max_local_cpu_size=2), roles)
    results = {}
    try:
        prefill, decode = system.engines["prefill"], system.engines["decode"]
        decode.time_to_first_token(fresh(64))  # warm-up: first requests pay one-off costs
        prefill.complete(fresh(64), max_tokens=1)
        for n in Progress(args.lengths, desc="bench routing", unit="length"):
            results[n] = one_length(prefill, decode, fresh, n, args.repeats)
    finally:
        system.stop()

    print_table(
        "straight to decode vs through prefill, per uncached prompt length (one core each)",
        ["tokens", "TTFT direct", "TTFT disagg", "stall direct", "stall disagg", "ITL p50"],
        [[n, *row.values()] for n, row in results.items()],
    )
    ratios = {}
    for n, row in results.items():
        ratios[f"ttft_direct_vs_disaggregated_{n}"] = (
            row["ttft_direct_ms"] / row["ttft_disaggregated_ms"]
        )
        ratios[f"stall_direct_vs_itl_{n}"] = row["stall_direct_ms"] / row["itl_ms"]
    write_json(
        args.json,
        {"settings": vars(args) | {"json": None}, "lengths": results, "ratios": ratios},
    )
    return 0


def one_length(
    prefill: Engine, decode: Engine, fresh: Callable[[int], list[int]], n: int, repeats: int
) -> dict[str, float]:
    """Both paths' TTFT for fresh `n`-token prompts, and the stall each puts on a stream."""

    def disaggregated(prompt: list[int]) -> float:
        started = time.perf_counter()
        prefill.complete(prompt, max_tokens=1)
        return time.perf_counter() - started + decode.time_to_first_token(prompt)

    paths = {"direct": decode.time_to_first_token, "disaggregated": disaggregated}
    ttft = {name: [ask(fresh(n)) for _ in range(repeats)] for name, ask in paths.items()}
    stalls: dict[str, list[float]] = {name: [] for name in paths}
    itl: list[float] = []
    for name, ask in paths.items():
        for _ in range(repeats):
            stream = Stream(decode.url, decode.model, fresh(32))
            stream.wait_started()
            started = time.perf_counter()
            ask(fresh(n))
            ended = time.perf_counter()
            stream.join()
            stalls[name].append(max(stream.gaps(started, ended)))
            itl += stream.gaps(0, started)[2:]
    return {
        "ttft_direct_ms": statistics.median(ttft["direct"]) * 1e3,
        "ttft_disaggregated_ms": statistics.median(ttft["disaggregated"]) * 1e3,
        "stall_direct_ms": statistics.median(stalls["direct"]) * 1e3,
        "stall_disaggregated_ms": statistics.median(stalls["disaggregated"]) * 1e3,
        "itl_ms": statistics.median(itl) * 1e3,
    }
