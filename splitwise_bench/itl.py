"""`bench itl`: what long prompts arriving through the proxy do to a stream on the decode engine.

A launched system (`--disagg auto`); a greedy stream on its decode engine, sent through the
proxy or straight to the engine (a client the proxy does not see); once the stream has run
quietly for a while, `--prompts` fresh `--prompt-tokens`-token prompts arrive through the
proxy at once. The stream's largest gap between two tokens while they are served, against its
median gap before they came, is what auto's ITL objective (`--itl-objective`) bounds: without
it, prefill saturates after a few long prompts and the next goes straight to the decode engine,
which computes it between two of the stream's tokens. Each `--itl-objective` value is one
launch (0 turns the rule off: the routing before it); each round uses fresh prompts.

The machine is shared: before each round it waits (a while) for other work to quiet, and it
records the share of the CPU other processes took during the round. A control round per
launch and placement runs the stream alone for as long: the gaps the machine makes by itself.

The JSON's `ratios` hold, per objective and stream placement, the worst round's largest gap
over its quiet median (`control.*`: the same for the stream alone; a round whose quiet tokens
came in bursts has no baseline and is left out); `rounds` hold every
round's worst gaps and when they began, the prompts' routes (the `x-splitwise-route` header)
and their times to first token (what the rule costs them).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from splitwise_bench.host_load import HostLoad, wait_for_quiet
from splitwise_bench.report import print_table, write_json
from splitwise_bench.stall import Stream
from splitwise_local.progress import Progress
from splitwise_local.proxy.routing import ROUTE_HEADER
from splitwise_testing.launch import Running, launch_system, sweep

HEALTH_DEADLINE_S = 60.0
QUIET_TOKENS = 40  # the stream's tokens before the prompts come: its quiet gaps
SETTLE_GAPS = 2  # its first gaps (its own prefill, the first steps) are not quiet ones
STREAM_TOKENS = 1500  # more than a round lasts: it is stopped, never ends by itself


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--itl-objective",
        type=float,
        nargs="+",
        default=[0.0, 100.0],
        metavar="MS",
        help="one launch per value, 0: the rule off (%(default)s)",
    )
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--output-tokens", type=int, default=16, help="each prompt's answer")
    parser.add_argument(
        "--stream-via", nargs="+", choices=["proxy", "engine"], default=["proxy", "engine"]
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per stream placement")
    parser.add_argument(
        "--control-s",
        type=float,
        default=15.0,
        help="per launch and stream placement, one round with no prompts this long: the gaps "
        "the machine's other work makes (0: none) (%(default)s)",
    )
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=30.0,
        help="before each round, wait up to this long for the machine's other work to quiet",
    )
    parser.add_argument("--model", help="as the launcher takes it (default: the embedded SmolLM2)")


def prompt_through_proxy(url: str, model: str, prompt: list[int], tokens: int) -> dict[str, Any]:
    """One prompt through the proxy, streamed: its route, its time to first token and when that
    came (`first_at`, perf_counter)."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        route = dict(part.split("=", 1) for part in reply.headers[ROUTE_HEADER].split("; "))
        for line in reply.iter_lines():
            if first is None and line.startswith("data: ") and '"text"' in line:
                first = time.perf_counter() - started
    return {
        "path": route["path"],
        "reason": route["reason"],
        "ttft_ms": None if first is None else round(first * 1e3, 1),
        "seconds": round(time.perf_counter() - started, 3),
        "first_at": None if first is None else started + first,
    }


def send_at_once(system: Running, prompts: list[list[int]], tokens: int) -> list[dict[str, Any]]:
    """The prompts through the proxy, all released at the same moment; their answers."""
    answers: list[dict[str, Any]] = [{} for _ in prompts]
    failures: list[BaseException] = []
    gate = threading.Barrier(len(prompts) + 1)

    def send(index: int) -> None:
        gate.wait()
        try:
            answers[index] = prompt_through_proxy(system.url, system.model, prompts[index], tokens)
        except Exception as exc:
            failures.append(exc)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    gate.wait()
    for thread in threads:
        thread.join(900)
    if failures:
        raise RuntimeError(f"a prompt failed: {failures[0]!r}")
    return answers


def one_round(
    system: Running, stream_url: str, fresh: Any, args: argparse.Namespace, prompts: int
) -> dict[str, Any]:
    """A quiet stream, then `prompts` prompts at once (none: the stream alone for
    `--control-s`, the machine's own noise); the stream's gaps before and while."""
    roots = [os.getpid(), system.launch.popen.pid]
    waited = wait_for_quiet(roots, args.quiet_wait_s)
    stream = Stream(stream_url, system.model, fresh(32), tokens=STREAM_TOKENS)
    try:
        stream.wait_started(QUIET_TOKENS, timeout=300)
        with HostLoad(roots) as host:
            started = time.perf_counter()
            if prompts:
                batch = [fresh(args.prompt_tokens) for _ in range(prompts)]
                answers = send_at_once(system, batch, args.output_tokens)
            else:
                answers = []
                time.sleep(args.control_s)
            ended = time.perf_counter()
    finally:
        stream.stop()
    quiet = stream.gaps(0, started)[SETTLE_GAPS:]
    loaded = stream.gaps(started, ended)
    quiet_ms, largest_ms = statistics.median(quiet) * 1e3, max(loaded) * 1e3
    # When the worst gaps began and when each prompt's first token came, in seconds after the
    # prompts were sent: which prompt's work each gap lines up with.
    worst = sorted(
        ((b - a, a) for a, b in itertools.pairwise(stream.arrivals) if b > started and a < ended),
        reverse=True,
    )[:3]
    for answer in answers:
        first_at = answer.pop("first_at")
        answer["first_token_after_s"] = None if first_at is None else round(first_at - started, 2)
    return {
        "quiet_median_ms": round(quiet_ms, 1),
        "quiet_gaps": len(quiet),
        "largest_gap_ms": round(largest_ms, 1),
        "gaps_while_prompts": len(loaded),
        # A zero median: the quiet tokens came in bursts (the client read them late), so the
        # round has no baseline and no ratio.
        "ratio": round(largest_ms / quiet_ms, 2) if quiet_ms > 0 else None,
        "worst_gaps": [
            {"ms": round(gap * 1e3, 1), "began_after_s": round(at - started, 2)}
            for gap, at in worst
        ],
        "seconds": round(ended - started, 2),
        "prompts": answers,
        "other_cpu": {"before": waited, "during": host.result["foreign_fraction"]},
    }


def run(args: argparse.Namespace) -> int:
    rng = random.Random(0)

    def fresh(n: int) -> list[int]:
        return [rng.randrange(1000, 40000) for _ in range(n)]

    root = Path(tempfile.mkdtemp(prefix="splitwise-bench-itl-"))
    print(f"launching the system once per ITL objective (logs in {root}) ...")
    counts = [args.prompts] * args.repeats + ([0] if args.control_s > 0 else [])
    rounds: list[dict[str, Any]] = []
    bar = Progress(
        total=len(args.itl_objective) * len(args.stream_via) * len(counts),
        desc="bench itl",
        unit="round",
    )
    for objective in args.itl_objective:
        extra = ["--disagg", "auto", "--route-detail", "--itl-objective", f"{objective:g}"]
        extra += ["--model", args.model] if args.model else []
        run_dir = root / f"objective-{objective:g}"
        system = launch_system(run_dir, HEALTH_DEADLINE_S, extra)
        try:
            decode_url = f"http://127.0.0.1:{system.ports['decode engine']}"
            prompt_through_proxy(system.url, system.model, fresh(64), 4)  # warm-up
            for via in args.stream_via:
                url = system.url if via == "proxy" else decode_url
                for count in counts:
                    result = one_round(system, url, fresh, args, count)
                    rounds.append({"itl_objective_ms": objective, "stream_via": via,
                                   "prompt_count": count, **result})  # fmt: skip
                    bar.update()
        finally:
            system.launch.stop()
            sweep(run_dir)
    bar.close()

    rows = [
        [r["itl_objective_ms"], r["stream_via"], r["prompt_count"], r["quiet_median_ms"],
         r["largest_gap_ms"], r["ratio"] or "-", r["other_cpu"]["during"],
         " ".join(f"{p['path'][:6]}/{p['reason']}" for p in r["prompts"]) or "-",
         max((p["ttft_ms"] or 0 for p in r["prompts"]), default="-")]
        for r in rounds
    ]  # fmt: skip
    print_table(
        f"a stream on decode while {args.prompts} prompts of {args.prompt_tokens} tokens arrive "
        "through the proxy (0 prompts: the stream alone, the machine's noise)",
        ["ITL objective ms", "stream via", "prompts", "quiet median ms", "largest gap ms",
         "ratio", "other CPU", "routes", "slowest TTFT ms"],
        rows,
    )  # fmt: skip
    ratios: dict[str, float] = {}
    for r in rounds:
        if r["ratio"] is None:
            continue
        kind = "control" if r["prompt_count"] == 0 else "largest_gap_vs_quiet_median"
        key = f"{kind}.objective_{r['itl_objective_ms']:g}.stream_via_{r['stream_via']}"
        ratios[key] = max(ratios.get(key, 0.0), r["ratio"])  # the worst round
    settings = vars(args) | {"json": None}
    write_json(args.json, {"settings": settings, "ratios": ratios, "rounds": rounds})
    return 0
