"""`bench serve`: a load generator for any OpenAI-compatible server, measured from the stream.

It sends a workload (workloads.py) at Poisson arrivals of a given rate or at a fixed
concurrency, or replays a public trace (`--trace`, traces.py: its arrivals and lengths, scaled
to the machine, both scales stated in the report), streams every request and times every chunk
as it arrives (streaming.py), and reports TTFT, ITL, TPOT and E2E latency with throughput, SLO
attainment and goodput (latency.py). The same command measures our proxy, a plain vLLM server or
anything else that speaks the API, so comparisons are like for like. Each run also records how
much CPU other processes on the machine used meanwhile (host_load.py), so a report can tell a
quiet run from a noisy one.

Every request's counts are checked: tokens counted in the stream against the usage chunk, and
both against the lengths the workload asked for. A mismatch is reported and makes the exit
status 1, because numbers from a run that did not do what it said are not worth comparing.
So does a failed request; a refused one (a 429 or 503 with `Retry-After`: a server's admission
control at work) does not, and is reported apart, with SLO attainment over every request sent
and over the requests admitted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from splitwise_bench import host_load, kv_cost, plots, report, traces
from splitwise_bench.latency import PERCENTILES, percentiles_ms, summarize
from splitwise_bench.streaming import run_load
from splitwise_bench.workloads import (
    WORKLOADS,
    RequestSpec,
    WorkloadError,
    WorkloadSettings,
    build_workload,
    poisson_arrivals,
    warmup_requests,
)
from splitwise_local.models.checkpoint import ModelError
from splitwise_local.models.hub import resolve_model


class ServerError(RuntimeError):
    """The server cannot be benchmarked (unreachable, no models); one line for the user."""


def normalize_url(url: str) -> str:
    """`http://host:port`, whether given with a trailing slash or `/v1`."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def server_model(base_url: str, wait_s: float) -> tuple[str, int | None]:
    """The served model's name and max_model_len (None if the server does not say), from
    /v1/models; polls for up to `wait_s` seconds while the server starts."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            response = httpx.get(f"{base_url}/v1/models", timeout=10.0)
            response.raise_for_status()
            models = response.json()["data"]
            if not models:
                raise ServerError(f"{base_url}/v1/models lists no model")
            return models[0]["id"], models[0].get("max_model_len")
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise ServerError(f"cannot list models at {base_url}/v1/models: {exc}") from None
            time.sleep(1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    load = parser.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="Poisson arrivals, requests per second")
    load.add_argument("--concurrency", type=int, default=4, help="requests in flight (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-dir", type=Path, help="write latency CDF and ITL PNGs here")
    traces.add_arguments(parser)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """What `bench serve` shares with `bench sweep`: the server, the workload, the SLOs and
    what to read around the run; not the load (rate, concurrency) or the seed."""
    parser.add_argument("--url", default="http://127.0.0.1:8030", help="server base URL")
    parser.add_argument("--model", help="tokenizer folder (default: the embedded SmolLM2)")
    parser.add_argument("--served-model-name", help="model name to send (default: /v1/models)")
    parser.add_argument("--label", default="run", help="name of this run in tables and plots")
    _add_workload_arguments(parser)
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    parser.add_argument(
        "--slo-tpot-ms",
        type=float,
        default=100.0,
        help="SLO on each request's mean time per output token after the first",
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests first")
    parser.add_argument(
        "--wait-ready",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for the server to answer /v1/models",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds without data before a request is given up",
    )
    parser.add_argument("--store-url", help="KV store to read stats from before and after")
    parser.add_argument(
        "--metrics-url",
        action="append",
        default=[],
        help="Prometheus endpoint to diff before and after (repeatable)",
    )
    parser.add_argument(
        "--ours-pid",
        type=int,
        action="append",
        default=[],
        metavar="PID",
        help="a process (with its descendants) whose CPU is the benchmark's own, not other "
        "load: the system under test when it is not the process listening at --url",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="mixed",
        help="fixed (short prompts: --prompt-len below the disaggregation threshold), mixed, "
        "shared-prefix, multi-turn (each turn resends its conversation's history)",
    )
    parser.add_argument("--num-requests", type=int, default=32)
    defaults = WorkloadSettings()
    parser.add_argument("--prompt-len", type=int, default=defaults.prompt_len)
    parser.add_argument("--output-len", type=int, default=defaults.output_len)
    parser.add_argument("--long-prompt-len", type=int, default=defaults.long_prompt_len)
    parser.add_argument("--long-output-len", type=int, default=defaults.long_output_len)
    parser.add_argument("--long-fraction", type=float, default=defaults.long_fraction)
    parser.add_argument("--prefix-len", type=int, default=defaults.prefix_len)
    parser.add_argument("--num-prefixes", type=int, default=defaults.num_prefixes)
    parser.add_argument(
        "--turns", type=int, default=defaults.turns, help="multi-turn: turns per conversation"
    )


def settings_from_args(args: argparse.Namespace) -> WorkloadSettings:
    return WorkloadSettings(
        kind=args.workload,
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        long_prompt_len=args.long_prompt_len,
        long_output_len=args.long_output_len,
        long_fraction=args.long_fraction,
        prefix_len=args.prefix_len,
        num_prefixes=args.num_prefixes,
        turns=args.turns,
        seed=args.seed,
    )


def print_results(label: str, results: dict[str, Any]) -> None:
    """The run's tables: the trace replayed (if any), latency, throughput, refusals (if any)."""
    if trace := results.get("trace"):
        print_trace(trace)
    rows = [
        [name, *(results[key][f"p{p}"] for p in PERCENTILES), results[key]["mean"]]
        for name, key in (
            ("TTFT ms", "ttft_ms"),
            ("TPOT ms", "tpot_ms"),
            ("ITL ms", "itl_ms"),
            ("E2E ms", "e2e_ms"),
        )
    ]
    report.print_table(
        f"bench serve: {label} latency", ["metric", "p50", "p90", "p99", "mean"], rows
    )
    print_throughput(label, results)
    if results["refused"]:
        print_refusals(label, results)


def print_trace(trace: dict[str, Any]) -> None:
    """Which rows of the trace were replayed, at what scales, and its ideal prefix reuse."""
    window, clipped = trace["window"], trace["clipped"]
    print(
        f"\ntrace {trace['name']}: rows {window['first_row']}-{window['last_row']} "
        f"({window['requests']} requests, {window['trace_span_s']:.1f} trace s), length scale "
        f"{trace['length_scale']:g}, time scale {trace['time_scale']:g}; clipped to "
        f"max_model_len {trace['max_model_len']}: {clipped['prompts']} prompts, "
        f"{clipped['outputs']} outputs"
    )
    if reuse := trace.get("prefix_reuse"):
        ideal = reuse["replay"]
        lru = ", ".join(
            f"{c['token_ratio']:.3f} at {c['capacity_tokens']:,} tokens" for c in reuse["lru"]
        )
        print(
            f"ideal prefix reuse ({trace['block_tokens']}-token blocks): "
            f"{ideal['block_ratio']:.3f} of blocks, {ideal['token_ratio']:.3f} of tokens"
            + (f"; under LRU: {lru}" if lru else "")
        )


def print_throughput(label: str, results: dict[str, Any]) -> None:
    checks = results["checks"]
    report.print_table(
        f"bench serve: {label} throughput",
        [
            "requests",
            "completed",
            "failed",
            "refused",
            "req/s",
            "output tok/s",
            "goodput req/s",
            "SLO attainment",
            "admitted's",
            "count mismatches",
            "other CPU %",
        ],
        [
            [
                results["requests"],
                results["completed"],
                results["failed"],
                results["refused"],
                results["requests_per_s"],
                results["output_tokens_per_s"],
                results["goodput_requests_per_s"],
                results["attainment"]["both"],
                results["attainment_admitted"]["both"],
                checks["requests_with_count_mismatch"],
                100 * results["host_load"]["foreign_fraction"],
            ]
        ],
    )


def print_refusals(label: str, results: dict[str, Any]) -> None:
    """Requests admission control turned away: how fast, with what status and Retry-After."""
    refusals = results["refusals"]
    latency = refusals["latency_ms"]
    report.print_table(
        f"bench serve: {label} refusals (admission control; not failures)",
        ["refused", "statuses", "p50 ms", "p99 ms", "max ms", "Retry-After s (count)"],
        [
            [
                results["refused"],
                ", ".join(f"{k} x{v}" for k, v in refusals["statuses"].items()),
                *(latency["p50"], latency["p99"], latency["max"]),
                ", ".join(f"{k} x{v}" for k, v in refusals["retry_after_s"].items()),
            ]
        ],
    )


@dataclass
class Target:
    """The server under test, as found before the first request."""

    base_url: str
    model: str  # the name to send
    max_model_len: int | None
    tokenizer: Any


def connect(args: argparse.Namespace) -> Target:
    """Finds the served model and loads the tokenizer (raises with one line)."""
    from transformers import AutoTokenizer  # heavy: imported by a run, not by `bench --help`

    base_url = normalize_url(args.url)
    served, max_model_len = server_model(base_url, args.wait_ready)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model).folder)
    return Target(base_url, args.served_model_name or served, max_model_len, tokenizer)


@dataclass
class Plan:
    """A run decided before the first request: where, which model, what, and when."""

    base_url: str
    model: str
    settings: WorkloadSettings
    specs: list[RequestSpec]
    warmup: list[RequestSpec]
    arrivals: list[float] | None
    replay: traces.ReplaySettings | None = None
    trace: dict[str, Any] | None = None  # a replay's summary (traces.build_replay)


def plan_run(args: argparse.Namespace, target: Target | None = None) -> Plan:
    """Checks everything that can be checked before sending (raises with one line)."""
    settings = settings_from_args(args)
    if getattr(args, "trace", None):
        return plan_replay(args, settings, target)
    if args.rate is None and args.concurrency < 1:
        raise WorkloadError(f"concurrency must be at least 1 (got {args.concurrency})")
    target = target or connect(args)
    settings.validate(target.max_model_len)
    specs = build_workload(settings, target.tokenizer)
    return Plan(
        base_url=target.base_url,
        model=target.model,
        settings=settings,
        specs=specs,
        warmup=warmup_requests(settings, target.tokenizer, args.warmup),
        arrivals=None if args.rate is None else poisson_arrivals(len(specs), args.rate, args.seed),
    )


def plan_replay(
    args: argparse.Namespace, settings: WorkloadSettings, target: Target | None
) -> Plan:
    """A trace replay's plan: the trace sets the requests and when they are sent."""
    if args.rate is not None:
        raise WorkloadError("--trace sends at the trace's own arrivals: drop --rate")
    replay_settings = traces.settings_from_args(args)
    replay_settings.validate()
    capacities = traces.capacities_from_args(args)
    target = target or connect(args)
    replay = traces.build_replay(
        replay_settings, target.tokenizer, target.max_model_len, capacities,
        args.kv_bytes_per_token,
    )  # fmt: skip
    return Plan(
        base_url=target.base_url,
        model=target.model,
        settings=settings,
        specs=replay.specs,
        warmup=warmup_requests(settings, target.tokenizer, args.warmup),
        arrivals=replay.arrivals,
        replay=replay_settings,
        trace=replay.summary,
    )


class WarmupFailed(RuntimeError):
    """A warm-up request failed: the server is not ready to be measured."""


def host_roots(base_url: str, extra: list[int] | None = None) -> list[int]:
    """Processes whose CPU is the benchmark's own: this one, `extra`, and the server listening
    at `base_url` (with their descendants), when it runs on this host."""
    roots = [os.getpid(), *(extra or [])]
    port = urlsplit(base_url).port
    if port is not None and (pid := host_load.listener_pid(port)) is not None:
        roots.append(pid)
    return roots


def warm_up(plan: Plan, args: argparse.Namespace) -> None:
    """Sends the plan's warm-up requests, unmeasured; raises WarmupFailed if one fails."""
    done, _ = asyncio.run(
        run_load(
            plan.base_url,
            plan.model,
            plan.warmup,
            arrivals=None,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            progress=False,
        )
    )
    failed = [r.error for r in done if not r.ok]
    if failed:
        raise WarmupFailed(f"warm-up request failed: {failed[0]}")


def measure(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """Warms the server up, sends the plan's requests and returns the run's full results."""
    load = {"timeout_s": args.timeout, "concurrency": args.concurrency}
    if plan.warmup:
        warm_up(plan, args)
    before = kv_cost.snapshot(args.store_url, args.metrics_url)
    with host_load.HostLoad(host_roots(plan.base_url, args.ours_pid)) as machine_load:
        results, duration = asyncio.run(
            run_load(
                plan.base_url,
                plan.model,
                plan.specs,
                arrivals=plan.arrivals,
                progress=not args.no_progress,
                **load,
            )
        )
    after = kv_cost.snapshot(args.store_url, args.metrics_url)
    summary = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
    if plan.replay is None:
        load_settings = {
            **asdict(plan.settings),
            "rate": args.rate,
            "concurrency": None if args.rate is not None else args.concurrency,
        }
        trace = {}
    else:
        load_settings = {"workload": "trace", **asdict(plan.replay)}
        lags = [r.start_s - r.scheduled_s for r in results if r.scheduled_s is not None]
        trace = {"trace": {**(plan.trace or {}), "send_lag_ms": percentiles_ms(lags)}}
    return {
        "label": args.label,
        "url": plan.base_url,
        "model": plan.model,
        "settings": {
            **load_settings,
            "warmup": args.warmup,
            "slo_ttft_ms": args.slo_ttft_ms,
            "slo_tpot_ms": args.slo_tpot_ms,
        },
        **trace,
        **summary,
        "kv_cost": kv_cost.compare(before, after, summary["completed"]),
        "host_load": machine_load.result,
        "per_request": [r.as_dict() for r in results],
    }


def run(args: argparse.Namespace) -> int:
    try:
        plan = plan_run(args)
        payload = measure(plan, args)
    except (WorkloadError, ServerError, ModelError, WarmupFailed) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_results(args.label, payload)
    report.write_json(args.json, payload)
    if args.plot_dir:
        for path in plots.write_plots({args.label: payload}, args.plot_dir):
            print(f"wrote {path}")
    return verdict(payload)


def verdict(results: dict[str, Any]) -> int:
    """0 when every request admitted completed with the counts it promised (refusals are the
    server's admission control at work, not failures); else 1, saying why."""
    checks = results["checks"]
    if results["failed"]:
        print(f"\n{results['failed']} request(s) failed: {results['errors'][:3]}", file=sys.stderr)
    if checks["requests_with_count_mismatch"]:
        first = next(iter(checks["problems"].items()))
        print(
            f"\ntoken counts disagree in {checks['requests_with_count_mismatch']} request(s), "
            f"e.g. request {first[0]}: {first[1]}",
            file=sys.stderr,
        )
    return 1 if results["failed"] or checks["requests_with_count_mismatch"] else 0
