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
import itertools
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from splitwise_bench.report import print_table, write_json
from splitwise_local.progress import Progress

LENGTHS = (32, 64, 128, 256, 512, 1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")


class Stream:
    """A long greedy generation on one engine, in a thread, recording when each token came."""

    def __init__(self, url: str, model: str, prompt: list[int], tokens: int = 120) -> None:
        self.arrivals: list[float] = []
        self.error: Exception | None = None
        body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        self._thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self._thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as reply:
                reply.raise_for_status()
                for line in reply.iter_lines():
                    if line.startswith("data: ") and '"text"' in line:
                        self.arrivals.append(time.perf_counter())
        except Exception as exc:  # told to whoever waits for it, not lost in the thread
            self.error = exc

    def wait_started(self, tokens: int = 8, timeout: float = 120.0) -> None:
        """Returns once `tokens` tokens have come; raises if the stream failed, ended short or
        did not get there within `timeout` seconds (an engine that stopped answering)."""
        deadline = time.monotonic() + timeout
        while True:
            running = self._thread.is_alive()  # read first: its last tokens come before it ends
            if len(self.arrivals) >= tokens:
                return
            if self.error is not None:
                raise RuntimeError(f"the background stream failed: {self.error!r}")
            if not running:
                raise RuntimeError(f"the background stream ended after {len(self.arrivals)} tokens")
            if time.monotonic() > deadline:
                had = len(self.arrivals)
                raise TimeoutError(f"the background stream had {had} of {tokens} tokens by now")
            time.sleep(0.005)

    def gaps(self, start: float, end: float) -> list[float]:
        """Gaps between consecutive tokens that end inside [start, end + one gap]."""
        return [b - a for a, b in itertools.pairwise(self.arrivals) if b >= start and a <= end]

    def join(self) -> None:
        """Waits for the stream's end; raises if it failed (its gaps would mean nothing)."""
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the background stream failed: {self.error!r}")


def run(args: argparse.Namespace) -> int:
    from splitwise_local.config import SplitwiseConfig
    from splitwise_local.models.hub import resolve_model
    from splitwise_testing.system import start_system

    model = resolve_model(args.model).folder
    rng = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(1000, 40000) for _ in range(n)]

    root = Path(tempfile.mkdtemp(prefix="splitwise-bench-routing-"))
    print(f"starting store, prefill and decode (kv_both) engines (logs in {root}) ...")
    roles = {"prefill": "prefill", "decode": "both"}
    system = start_system(root, model, SplitwiseConfig(max_local_cpu_size=2), roles)
    rows, results = [], {}
    try:
        prefill, decode = system.engines["prefill"], system.engines["decode"]
        decode.time_to_first_token(fresh(64))  # warm-up: first requests pay one-off costs
        prefill.complete(fresh(64), max_tokens=1)

        def disaggregated(prompt: list[int]) -> float:
            started = time.perf_counter()
            prefill.complete(prompt, max_tokens=1)
            return time.perf_counter() - started + decode.time_to_first_token(prompt)

        for n in Progress(args.lengths, desc="bench routing", unit="length"):
            paths = {"direct": decode.time_to_first_token, "disaggregated": disaggregated}
            ttft = {
                name: [ask(fresh(n)) for _ in range(args.repeats)] for name, ask in paths.items()
            }
            stalls: dict[str, list[float]] = {name: [] for name in paths}
            itl: list[float] = []
            for name, ask in paths.items():
                for _ in range(args.repeats):
                    stream = Stream(decode.url, decode.model, fresh(32))
                    stream.wait_started()
                    started = time.perf_counter()
                    ask(fresh(n))
                    ended = time.perf_counter()
                    stream.join()
                    stalls[name].append(max(stream.gaps(started, ended)))
                    itl += stream.gaps(0, started)[2:]
            stall = {name: statistics.median(values) for name, values in stalls.items()}
            itl_ms = statistics.median(itl) * 1e3
            row = {
                "ttft_direct_ms": statistics.median(ttft["direct"]) * 1e3,
                "ttft_disaggregated_ms": statistics.median(ttft["disaggregated"]) * 1e3,
                "stall_direct_ms": stall["direct"] * 1e3,
                "stall_disaggregated_ms": stall["disaggregated"] * 1e3,
                "itl_ms": itl_ms,
            }
            results[n] = row
            rows.append([n, *row.values()])
    finally:
        system.stop()

    print_table(
        "straight to decode vs through prefill, per uncached prompt length (one core each)",
        ["tokens", "TTFT direct", "TTFT disagg", "stall direct", "stall disagg", "ITL p50"],
        rows,
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
