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

`--tracing` adds a second proxy that traces every request (OpenTelemetry over OTLP/HTTP to a
receiver in a process of its own, `splitwise_testing.otlp_receiver`) and reports what tracing
adds over the untraced proxy, the two alternating in every round (their order swapped each
round): pooled percentiles, and the median over rounds of each round's difference of p50s,
which one noisy round on a shared machine moves less.

`--peer vllm-router` runs vLLM's own PD proxy (the Rust `vllm-router`, `--vllm-pd-disaggregation`,
its default policy) in front of the same two fakes, alternating with ours in every round, and
reports its added latency beside ours. It speaks vLLM's NixlConnector protocol: the prefill copy
asks `do_remote_decode`, and the `kv_transfer_params` the prefill fake answers with (in
NixlConnector's shape) go on to decode; ours has no such step, its engines share a store.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
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
TRACING_GOAL_P50_MS = 0.5
PEER = "vllm_router"  # its key in the results; the package and its command are `vllm-router`


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
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also run a proxy that traces every request (OTLP/HTTP to a receiver process) and "
        "report the latency tracing adds",
    )
    parser.add_argument(
        "--peer",
        choices=["vllm-router"],
        help="also measure vLLM's Rust PD proxy (the `bench` extra installs it) beside ours, "
        "alternating with it in every round",
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


def peer_argv(urls: dict[str, str], ports: dict[str, int]) -> list[str]:
    """vllm-router in PD mode over the two fakes, as its README starts it (default policy)."""
    argv = ["-m", "vllm_router.launch_router", "--vllm-pd-disaggregation"]
    argv += ["--prefill", urls["prefill"], "--decode", urls["decode"]]
    argv += ["--host", "127.0.0.1", "--port", str(ports[PEER])]
    return [*argv, "--prometheus-port", str(ports["peer_metrics"]), "--log-level", "warning"]


def run(args: argparse.Namespace) -> int:
    if args.peer and importlib.util.find_spec("vllm_router") is None:
        print("bench proxy --peer vllm-router: vllm-router is not installed (pip install "
              "vllm-router; scripts/setup.sh installs it)", file=sys.stderr)  # fmt: skip
        return 2
    names = ["prefill", "decode", "proxy", *(["traced", "otlp"] if args.tracing else [])]
    names += [PEER, "peer_metrics"] if args.peer else []
    ports = {name: free_port() for name in names}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    fake = ["-m", "splitwise_testing.fake_engine", "--tokens", str(args.tokens)]
    # Prefill answers at once: its compute time is the engine's, not the proxy's.
    paced = {"prefill": "0", "decode": str(args.token_interval_ms)}
    proxy = ["-m", "splitwise_local", "proxy"]
    proxy += ["--prefill", urls["prefill"], "--decode", urls["decode"], "--log-level", "warning"]
    proxy += ["--admission"] if args.admission else []
    proxies = {"proxy": [*proxy, "--port", str(ports["proxy"])]}
    if args.tracing:
        proxies["traced"] = [*proxy, "--port", str(ports["traced"]), "--otlp-traces-endpoint",
                             urls["otlp"], "--otlp-traces-protocol", "http/protobuf"]  # fmt: skip
    if args.peer:
        proxies[PEER] = peer_argv(urls, ports)
    results: dict[str, dict] = {}
    received: dict[str, int] = {}  # by the OTLP receiver
    cases = Progress(total=2 * len(args.concurrency), desc="bench proxy", unit="case")
    with ExitStack() as stack:
        stack.callback(cases.close)
        for role in ("prefill", "decode"):
            argv = [*fake, "--name", role, "--port", str(ports[role])]
            argv += ["--token-interval-ms", paced[role]]
            stack.enter_context(server(argv, urls[role]))
        if args.tracing:
            receiver = ["-m", "splitwise_testing.otlp_receiver", "--port", str(ports["otlp"])]
            stack.enter_context(server(receiver, urls["otlp"], health="/stats"))
            # Read once the proxies have stopped: the traced one exports its last spans first.
            stack.callback(count_spans, urls["otlp"], received)
        processes = {
            name: psutil.Process(stack.enter_context(server(argv, urls[name])))
            for name, argv in proxies.items()
        }
        for clients in args.concurrency:
            for stream in (False, True):
                case = f"{'stream' if stream else 'whole'}_c{clients}"
                cases.set_postfix_str(case)
                results[case] = measure_case(args, urls, processes, clients, stream)
                cases.update()
    peer = {"argv": ["vllm-router", *proxies[PEER][2:]]} if args.peer else None
    return report_results(args, results, received.get("spans"), peer)


def measure_case(
    args: argparse.Namespace,
    urls: dict[str, str],
    processes: dict[str, psutil.Process],
    clients: int,
    stream: bool,
) -> dict:
    """One case (clients, whole or streamed): the decode engine directly and each proxy in
    `processes`, alternating round by round, with each proxy's CPU per request."""
    per_client = args.single_client_requests if clients == 1 else args.requests_per_client
    spread = args.tokens * args.token_interval_ms / 1000
    case_args = (stream, clients, per_client, spread)
    direct: list[Sample] = []
    proxied: dict[str, list[Sample]] = {name: [] for name in processes}
    rounds: dict[str, list[list[Sample]]] = {name: [] for name in processes}
    cpu_s = dict.fromkeys(processes, 0.0)
    for i in range(args.rounds):  # alternating, so all see the same neighbours
        direct += asyncio.run(run_case(urls["decode"], *case_args))
        for name in list(processes)[:: 1 if i % 2 == 0 else -1]:
            cpu_before = sum(processes[name].cpu_times()[:2])
            samples = asyncio.run(run_case(urls[name], *case_args))
            cpu_s[name] += sum(processes[name].cpu_times()[:2]) - cpu_before
            proxied[name] += samples
            rounds[name].append(samples)
    sent = len(direct) + clients * args.rounds  # with the warm-up requests
    result = {
        "clients": clients,
        "requests": len(direct),
        "direct": summarize(direct),
        "proxy": summarize(proxied["proxy"]),
        "proxy_cpu_ms_per_request": cpu_s["proxy"] * 1000 / sent,
    }
    if stream:
        result["chunks_held_back"] = held_back(proxied["proxy"], args.token_interval_ms)
    if args.tracing:
        result |= {
            "traced": summarize(proxied["traced"]),
            "traced_cpu_ms_per_request": cpu_s["traced"] * 1000 / sent,
            "tracing_added_ms": tracing_added(rounds["proxy"], rounds["traced"]),
        }
    if PEER in processes:
        result |= {
            PEER: summarize(proxied[PEER]),
            f"{PEER}_cpu_ms_per_request": cpu_s[PEER] * 1000 / sent,
        }
        if stream:
            result[f"{PEER}_chunks_held_back"] = held_back(proxied[PEER], args.token_interval_ms)
    return result


def count_spans(url: str, received: dict[str, int]) -> None:
    received.update(httpx.get(url + "/stats").json())


def tracing_added(
    untraced: list[list[Sample]], traced: list[list[Sample]]
) -> dict[str, dict[str, float]]:
    """What the traced proxy adds per metric: pooled p50 and p99 differences, and the median
    over rounds of each round's p50 difference."""
    added = {}
    pooled = [summarize([s for r in runs for s in r]) for runs in (untraced, traced)]
    for metric in pooled[0]:
        per_round = [
            summarize(on)[metric]["p50"] - summarize(off)[metric]["p50"]
            for off, on in zip(untraced, traced, strict=True)
        ]
        added[metric] = {
            "p50": pooled[1][metric]["p50"] - pooled[0][metric]["p50"],
            "p99": pooled[1][metric]["p99"] - pooled[0][metric]["p99"],
            "p50_median_of_rounds": float(np.median(per_round)),
            "p50_per_round": per_round,
        }
    return added


def print_added(results: dict[str, dict]) -> None:
    """The latency the proxy adds per case and metric, stored in each result as `added_ms`."""
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


def report_results(
    args: argparse.Namespace,
    results: dict[str, dict],
    spans_received: int | None = None,
    peer: dict[str, object] | None = None,
) -> int:
    print_added(results)
    summary = {
        "settings": {
            "tokens": args.tokens,
            "token_interval_ms": args.token_interval_ms,
            "requests_per_client": args.requests_per_client,
            "single_client_requests": args.single_client_requests,
            "rounds": args.rounds,
            "admission": args.admission,
            "tracing": args.tracing,
            "peer": args.peer,
            "load_average_1m_at_end": os.getloadavg()[0],
        },
        "results": results,
    }
    if args.tracing:
        summary["tracing"] = report_tracing(results, spans_received)
    if peer is not None:
        summary["peer"] = report_peer(results, peer)
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
    summary["ratios"] = ratios(results)
    report.write_json(args.json, summary)
    return 0


def ratios(results: dict[str, dict]) -> dict[str, float]:
    """Time to first token at 64 streams, p50: through each proxy over direct, and traced over
    untraced."""
    c64 = results.get("stream_c64")
    if c64 is None:
        return {}
    names = ("direct", "proxy", "traced", PEER)
    p50 = {name: c64[name]["ttft_ms"]["p50"] for name in names if name in c64}
    found = {f"{name}_over_direct_ttft_p50_c64": p50[name] / p50["direct"] for name in p50}
    found.pop("direct_over_direct_ttft_p50_c64")
    if "traced" in p50:
        found["traced_over_untraced_ttft_p50_c64"] = p50["traced"] / p50["proxy"]
    if PEER in p50:
        found[f"proxy_over_{PEER}_ttft_p50_c64"] = p50["proxy"] / p50[PEER]
    return found


def report_peer(results: dict[str, dict], peer: dict[str, object]) -> dict[str, object]:
    """vllm-router's added latency beside ours, per case (a table) and at 64 streams (against
    the same goal)."""
    rows = []
    for case, result in results.items():
        for metric in result["added_ms"]:
            direct, theirs = result["direct"][metric], result[PEER][metric]
            added = {p: theirs[p] - direct[p] for p in ("p50", "p99")}
            result.setdefault(f"{PEER}_added_ms", {})[metric] = added
            ours = result["added_ms"][metric]
            rows.append(
                [case, metric.removesuffix("_ms"), direct["p50"], ours["p50"], added["p50"],
                 ours["p99"], added["p99"], result["proxy"][metric]["p50"] / theirs["p50"],
                 result["proxy_cpu_ms_per_request"] if metric == "e2e_ms" else "",
                 result[f"{PEER}_cpu_ms_per_request"] if metric == "e2e_ms" else ""]
            )  # fmt: skip
    headers = ["case", "metric", "direct p50", "added p50 ours", "added p50 vllm-router"]
    headers += ["added p99 ours", "added p99 vllm-router", "p50 ours/vllm-router"]
    headers += ["CPU/req ours", "CPU/req vllm-router"]
    report.print_table("Latency added: ours beside vllm-router (ms)", headers, rows)
    summary = {
        "name": "vllm-router",
        "version": importlib.metadata.version("vllm-router"),
        "mode": "PD (--vllm-pd-disaggregation): prefill copy with max_tokens 1, then decode "
        "with the prefill answer's kv_transfer_params",
        **peer,
    }
    if "stream_c64" in results:
        c64 = results["stream_c64"]
        top = c64[f"{PEER}_added_ms"]["ttft_ms"]
        met = top["p50"] <= GOAL_P50_MS and top["p99"] <= GOAL_P99_MS
        summary |= {
            "added_p50_ms_c64": top["p50"],
            "added_p99_ms_c64": top["p99"],
            "added_metric": "ttft",
            "chunks_held_back_c64": c64[f"{PEER}_chunks_held_back"],
            "goal_met": met,
        }
        print(
            f"\n64 streams, added time to first token through vllm-router: p50 {top['p50']:.2f} "
            f"ms, p99 {top['p99']:.2f} ms: {'met' if met else 'NOT met'}; chunks held back: "
            f"{c64[f'{PEER}_chunks_held_back']}"
        )
    return summary


def report_tracing(results: dict[str, dict], spans_received: int | None) -> dict[str, object]:
    """What tracing adds, per case (a table) and at 64 streams (against its goal)."""
    rows = []
    for case, result in results.items():
        for metric, added in result["tracing_added_ms"].items():
            untraced, traced = result["proxy"][metric], result["traced"][metric]
            rows.append(
                [case, metric.removesuffix("_ms"), untraced["p50"], traced["p50"], added["p50"],
                 added["p50_median_of_rounds"], untraced["p99"], traced["p99"], added["p99"],
                 result["proxy_cpu_ms_per_request"] if metric == "e2e_ms" else "",
                 result["traced_cpu_ms_per_request"] if metric == "e2e_ms" else ""]
            )  # fmt: skip
    headers = ["case", "metric", "off p50", "on p50", "added p50", "added p50 (median of rounds)"]
    headers += ["off p99", "on p99", "added p99", "CPU/req off", "CPU/req on"]
    report.print_table("Latency tracing adds to the proxy (ms)", headers, rows)
    summary: dict[str, object] = {
        "spans_received": spans_received,
        "goal_p50_ms": TRACING_GOAL_P50_MS,
        # The SDK's sampler, as the environment sets it for the traced proxy.
        "sampler": os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
        "sampler_arg": os.environ.get("OTEL_TRACES_SAMPLER_ARG"),
    }
    if "stream_c64" in results:
        added = results["stream_c64"]["tracing_added_ms"]["ttft_ms"]
        met = added["p50_median_of_rounds"] <= TRACING_GOAL_P50_MS
        summary |= {
            "added_p50_ms_c64": added["p50"],
            "added_p50_ms_c64_median_of_rounds": added["p50_median_of_rounds"],
            "added_p99_ms_c64": added["p99"],
            "added_metric": "ttft",
            "goal_met": met,
        }
        print(
            f"\n64 streams, time to first token added by tracing: p50 {added['p50']:.2f} ms "
            f"(median of rounds {added['p50_median_of_rounds']:.2f}; goal <= "
            f"{TRACING_GOAL_P50_MS}): {'met' if met else 'NOT met'}"
        )
    return summary
