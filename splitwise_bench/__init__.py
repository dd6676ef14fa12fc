"""`python -m splitwise_local bench NAME`: each benchmark is one module in this package.

Every benchmark module exposes `add_arguments(parser)` and `run(args) -> int`, prints a table
(`report.print_table`) and writes JSON with `--json PATH` (`report.write_json`). Targets are
ratios against a baseline measured in the same run, never absolute timings.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, str] = {
    "store": "KV store throughput (TCP, shared memory) against socket and memcpy baselines",
    "proxy": "latency the proxy adds, with fake engines that answer instantly",
    "connector": "decode TTFT with KV loaded from the store against recomputing the prompt",
    "serde": "size, speed and quality of the KV compression serdes on real KV",
    "serve": "load generator against any OpenAI-compatible URL",
    "routing": "straight to decode vs through prefill per prompt length: auto's threshold",
    "itl": "a stream on decode while long prompts arrive through the proxy: auto's ITL objective",
    "sweep": "SLO attainment of one server across request rates and seeds (DistServe's metric)",
    "chaos": "faults under load (kill -9, freeze): failed requests, recovery seconds, orphans",
    "soak": "the mixed workload for N minutes: errors, latency per minute, RSS and fds drift",
    "prefill": "prefill tokens/s of the launched system against plain bf16 and fp32 engines",
    "save_stall": "decode's token gaps while prompts are saved to a store slow to write",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, help_text in BENCHMARKS.items():
        sub = names.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", metavar="PATH", help="write the results as JSON")
        importlib.import_module(f"splitwise_bench.{name}").add_arguments(sub)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"splitwise_bench.{args.benchmark}")
    return int(module.run(args) or 0)
