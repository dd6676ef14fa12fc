"""`bench proxy`: the latency the proxy adds, against calling the decode engine directly.

Two fake engines (prefill, decode; `splitwise_testing.fake_engine`) and the proxy
(`python -m splitwise_local proxy`, as users run it) each get their own process; the clients
run here. For 1 and 64 concurrent clients, whole and streamed, the same requests go once
straight to the decode fake (the baseline) and once through the proxy (which adds the prefill
hop and the relay), in the same run. The fakes do no work, but pace their tokens like a decode
engine (`--token-interval-ms`), so 64 streams are 64 open streams rather than a tight loop that
would only measure how fast Python can serve requests. The proxy runs with admission control
on (`--no-admission`: off), its bound measured as in serving; the fakes keep up, so it refuses
nothing and only its cost shows. Reported per case: end-to-end latency, and for streams the
time to first token and each chunk's delay from the moment the engine wrote it (stamped in the
chunk) to the moment the caller read it. A chunk counts as held back when it arrives after the
engine had already sent the next one. Direct and proxied runs alternate (`--rounds`) so that
both meet the same background load on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np
import psutil

from splitwise_bench import report
from splitwise_local.progress import Progress
from splitwise_local.serve.ports import free_port

GOAL_P50_MS = 2.0
GOAL_P99_MS = 10.0


@dataclass
class Sample:
    """One request's timings, in milliseconds."""

    e2e: float
    ttft: float | None = None
    chunk_delays: list[float] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer")
    parser.add_argument(
        "--token-interval-ms", type=float, default=20.0, help="fake decode pace (0: instant)"
    )
    parser.add_argument(
        "--requests-per-client", type=int, default=3, help="per round, with several clients"
    )
    parser.add_argument("--single-client-requests", type=int, default=10, help="per round")
    parser.add_argument(
        "--rounds", type=int, default=2, help="direct and proxied runs alternate this many times"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument(
        "--admission",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the proxy with admission control on (default: on)",
    )


@contextmanager
def server(argv: list[str], url: str, health: str = "/health") -> Iterator[int]:
    """Runs a server process until it answers `health`; yields its pid; stops it on exit."""
    process = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(argv)} exited with {process.returncode}")
            try:
                if httpx.get(url + health, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv)} did not answer {health} within 60 s")
            time.sleep(0.05)
        yield process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def one_request(client: aiohttp.ClientSession, url: str, stream: bool) -> Sample:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "How far is the Moon?"}],
        "stream": stream,
    }
    started = time.time()
    sample = Sample(e2e=0.0)
    async with client.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        if not stream:
            await response.read()
        else:
            async for line in response.content:
                now = time.time()
                if not line.startswith(b"data: {"):
                    continue
                if sample.ttft is None:
                    sample.ttft = (now - started) * 1000
                sample.chunk_delays.append((now - json.loads(line[6:])["sent_at"]) * 1000)
    sample.e2e = (time.time() - started) * 1000
    return sample


async def run_case(
    url: str, stream: bool, clients: int, per_client: int, spread_s: float
) -> list[Sample]:
    """`clients` callers, each sending `per_client` requests one after another.

    Their starts are spread over `spread_s` (one answer's duration): answers all take the
    same time, so callers started together would stay in lock-step and arrive in bursts.
    """
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as client:
        await asyncio.gather(*(one_request(client, url, stream) for _ in range(clients)))  # warm

        async def caller(i: int) -> list[Sample]:
            await asyncio.sleep(i * spread_s / clients)
            return [await one_request(client, url, stream) for _ in range(per_client)]

        batches = await asyncio.gather(*(caller(i) for i in range(clients)))
    return [sample for batch in batches for sample in batch]


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": float(p50), "p99": float(p99), "max": float(max(values))}


def summarize(samples: list[Sample]) -> dict[str, dict[str, float]]:
    summary = {"e2e_ms": percentiles([s.e2e for s in samples])}
    if samples[0].ttft is not None:
        summary["ttft_ms"] = percentiles([s.ttft for s in samples if s.ttft is not None])
        summary["chunk_delay_ms"] = percentiles([d for s in samples for d in s.chunk_delays])
    return summary


def held_back(samples: list[Sample], interval_ms: float) -> int:
    return sum(d > interval_ms for s in samples for d in s.chunk_delays[:-1])


def run(args: argparse.Namespace) -> int:
    ports = {name: free_port() for name in ("prefill", "decode", "proxy")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    fake = ["-m", "splitwise_testing.fake_engine", "--tokens", str(args.tokens)]
    # Prefill answers at once: its compute time is the engine's, not the proxy's.
    paced = {"prefill": "0", "decode": str(args.token_interval_ms)}
    proxy = ["-m", "splitwise_local", "proxy", "--port", str(ports["proxy"])]
    proxy += ["--prefill", urls["prefill"], "--decode", urls["decode"], "--log-level", "warning"]
    proxy += ["--admission"] if args.admission else []
    results: dict[str, dict] = {}
    cases = Progress(total=2 * len(args.concurrency), desc="bench proxy", unit="case")
    with ExitStack() as stack:
        stack.callback(cases.close)
        for role in ("prefill", "decode"):
            argv = [*fake, "--name", role, "--port", str(ports[role])]
            argv += ["--token-interval-ms", paced[role]]
            stack.enter_context(server(argv, urls[role]))
        proxy_process = psutil.Process(stack.enter_context(server(proxy, urls["proxy"])))
        for clients in args.concurrency:
            per_client = args.single_client_requests if clients == 1 else args.requests_per_client
            for stream in (False, True):
                case = f"{'stream' if stream else 'whole'}_c{clients}"
                cases.set_postfix_str(case)
                spread = args.tokens * args.token_interval_ms / 1000
                case_args = (stream, clients, per_client, spread)
                direct, proxied, cpu_s = [], [], 0.0
                for _ in range(args.rounds):  # alternating, so both see the same neighbours
                    direct += asyncio.run(run_case(urls["decode"], *case_args))
                    cpu_before = sum(proxy_process.cpu_times()[:2])
                    proxied += asyncio.run(run_case(urls["proxy"], *case_args))
                    cpu_s += sum(proxy_process.cpu_times()[:2]) - cpu_before
                sent = len(proxied) + clients * args.rounds  # with the warm-up requests
                results[case] = {
                    "clients": clients,
                    "requests": len(proxied),
                    "direct": summarize(direct),
                    "proxy": summarize(proxied),
                    "proxy_cpu_ms_per_request": cpu_s * 1000 / sent,
                }
                if stream:
                    results[case]["chunks_held_back"] = held_back(proxied, args.token_interval_ms)
                cases.update()
    return report_results(args, results)


def report_results(args: argparse.Namespace, results: dict[str, dict]) -> int:
    rows = []
    for case, result in results.items():
        for metric in ("e2e_ms", "ttft_ms", "chunk_delay_ms"):
            if metric not in result["proxy"]:
                continue
            direct, proxied = result["direct"][metric], result["proxy"][metric]
            added = {p: proxied[p] - direct[p] for p in ("p50", "p99")}
            result.setdefault("added_ms", {})[metric] = added
            rows.append(
                [case, metric.removesuffix("_ms"), direct["p50"], direct["p99"], proxied["p50"],
                 proxied["p99"], added["p50"], added["p99"], proxied["p50"] / direct["p50"],
                 result["proxy_cpu_ms_per_request"] if metric == "e2e_ms" else ""]
            )  # fmt: skip
    headers = ["case", "metric", "direct p50", "direct p99", "proxy p50", "proxy p99"]
    headers += ["added p50", "added p99", "p50 ratio", "proxy CPU/req"]
    report.print_table("Latency added by the proxy (ms)", headers, rows)
    summary = {
        "settings": {
            "tokens": args.tokens,
            "token_interval_ms": args.token_interval_ms,
            "requests_per_client": args.requests_per_client,
            "single_client_requests": args.single_client_requests,
            "rounds": args.rounds,
            "admission": args.admission,
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "results": results,
    }
    if "stream_c64" in results:
        # The headline is the added time to first token: it holds the whole prefill hop, and
        # unlike end-to-end time it is not blurred by the fake's token pacing.
        c64 = results["stream_c64"]
        top = c64["added_ms"]["ttft_ms"]
        met = top["p50"] <= GOAL_P50_MS and top["p99"] <= GOAL_P99_MS
        summary |= {
            "added_p50_ms_c64": top["p50"],
            "added_p99_ms_c64": top["p99"],
            "added_metric": "ttft",
            "chunk_delay_added_p50_ms_c64": c64["added_ms"]["chunk_delay_ms"]["p50"],
            "chunk_delay_added_p99_ms_c64": c64["added_ms"]["chunk_delay_ms"]["p99"],
            "chunks_held_back_c64": c64["chunks_held_back"],
            "goal_met": met,
        }
        print(
            f"\n64 streams, added time to first token: p50 {top['p50']:.2f} ms "
            f"(goal <= {GOAL_P50_MS}), p99 {top['p99']:.2f} ms (goal <= {GOAL_P99_MS}): "
            f"{'met' if met else 'NOT met'}; chunks held back: {c64['chunks_held_back']}"
        )
    report.write_json(args.json, summary)
    return 0
