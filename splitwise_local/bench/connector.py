"""`bench connector`: decode TTFT with the prompt's KV loaded from the store vs recomputed.

One run starts our store, a prefill engine and a decode engine (real vLLM on the CPU, one core
each, prefix caching off). For each repeat it takes two fresh prompts of the same length: one
goes straight to the decode engine (it computes the whole prompt), the other goes to prefill
first (max_tokens=1) and then to decode (which loads prompt_len - 1 tokens and computes one).
The ratio of median TTFTs is the number that matters; the decode engine's own log line gives
the bytes moved and the load time, compared with the store's get throughput for the same bytes.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from splitwise_local.bench.report import print_table, write_json

LOAD_LINE = re.compile(r"splitwise load req=\S+ tokens=(\d+) chunks=(\d+) bytes=(\d+) ms=([\d.]+)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--serde", default="naive", choices=["naive", "kivi", "cachegen"])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--pipelined", action="store_true", help="pipelined_backend: true")
    parser.add_argument(
        "--new-tokens", type=int, default=64, help="greedy tokens compared for divergence"
    )


def token_ids(reply: dict) -> list[int]:
    return reply["choices"][0]["token_ids"]


def first_divergence(got: list[int], expected: list[int]) -> int:
    """Index of the first differing greedy token; the length when all agree."""
    pairs = zip(got, expected, strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(expected)))


def store_get_gbps(backend, keys: list[str], repeats: int = 5) -> float:
    """The store's own throughput for the same chunks, fetched in one batch, in GB/s."""
    best = float("inf")
    size = 0
    for _ in range(repeats):
        started = time.perf_counter()
        values = backend.get_many(keys)
        best = min(best, time.perf_counter() - started)
        size = sum(len(v) for v in values if v is not None)
    return size / best / 1e9


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from splitwise_local.bench.engines import PROSE, start_system
    from splitwise_local.config import SplitwiseConfig
    from splitwise_local.models.hub import resolve_model
    from splitwise_local.progress import Progress

    model = resolve_model(args.model).folder
    tokens = AutoTokenizer.from_pretrained(model)(PROSE.read_text(), add_special_tokens=False)[
        "input_ids"
    ]
    needed = 2 * args.repeats * args.prompt_tokens
    tokens = (tokens * (needed // len(tokens) + 1))[:needed]
    prompts = [
        tokens[i * args.prompt_tokens : (i + 1) * args.prompt_tokens]
        for i in range(2 * args.repeats)
    ]
    # Each prompt must be distinct from the others from its first token on.
    prompts = [[1000 + i, *p[1:]] for i, p in enumerate(prompts)]
    config = SplitwiseConfig(
        chunk_size=args.chunk_size,
        remote_serde=args.serde,
        pipelined_backend=args.pipelined,
        max_local_cpu_size=2,
    )
    root = Path(tempfile.mkdtemp(prefix="splitwise-bench-connector-"))
    print(f"starting store, prefill and decode engines (logs in {root}) ...")
    system = start_system(root, model, config, {"prefill": "prefill", "decode": "decode"})
    try:
        prefill, decode = system.engines["prefill"], system.engines["decode"]
        decode.time_to_first_token(prompts[0][:64])  # warm-up: first request pays one-off costs
        recompute, loaded, loads, divergence = [], [], [], []
        for i in Progress(range(args.repeats), desc="bench connector", unit="prompt"):
            recompute.append(decode.time_to_first_token(prompts[2 * i]))
            prompt = prompts[2 * i + 1]
            # The prefill engine's own greedy continuation is the reference (a full forward).
            reference = prefill.complete(prompt, max_tokens=args.new_tokens)
            decode.new_log()
            loaded.append(decode.time_to_first_token(prompt))
            loads += [tuple(map(float, m)) for m in decode.expect_log(LOAD_LINE.pattern)]
            got = decode.complete(prompt, max_tokens=args.new_tokens)
            divergence.append(first_divergence(token_ids(got), token_ids(reference)))
        keys = re.findall(r"key=(\w+)", prefill.new_log())
        get_gbps = store_get_gbps(system.backend(), keys[-8:]) if keys else float("nan")
    finally:
        system.stop()

    recompute_ms = statistics.median(recompute) * 1e3
    loaded_ms = statistics.median(loaded) * 1e3
    moved = statistics.median(load[2] for load in loads) if loads else 0.0
    load_ms = statistics.median(load[3] for load in loads) if loads else float("nan")
    effective_gbps = moved / (load_ms / 1e3) / 1e9 if loads else float("nan")
    ratio = loaded_ms / recompute_ms
    print_table(
        f"decode TTFT, {args.prompt_tokens}-token prompt, {args.repeats} repeats, "
        f"chunk_size={args.chunk_size}, serde={args.serde}",
        ["case", "TTFT p50 (ms)", "KV bytes", "load (ms)", "GB/s"],
        [
            ["recompute (decode computes the prompt)", recompute_ms, 0, "-", "-"],
            ["loaded from the store", loaded_ms, int(moved), load_ms, effective_gbps],
            ["store get, same chunks (baseline)", "-", "-", "-", get_gbps],
        ],
    )
    print(f"\nttft_loaded_vs_recompute = {ratio:.3f} (goal <= 0.25)")
    print(
        f"greedy first divergence from a full forward, per prompt: {divergence} "
        f"(of {args.new_tokens}; {args.new_tokens} = identical)"
    )
    write_json(
        args.json,
        {
            "settings": vars(args) | {"json": None},
            "recompute_ttft_ms": [t * 1e3 for t in recompute],
            "loaded_ttft_ms": [t * 1e3 for t in loaded],
            "kv_bytes_per_request": moved,
            "load_ms": load_ms,
            "load_gbps": effective_gbps,
            "store_get_gbps": get_gbps,
            "first_divergence": divergence,
            "ratios": {
                "ttft_loaded_vs_recompute": ratio,
                "load_vs_store_get": effective_gbps / get_gbps if get_gbps else None,
            },
        },
    )
    return 0
