"""`bench connector`: what loading a prompt's KV costs the decode engine, against fair baselines.

One run starts a store, a prefill engine and a decode engine (real vLLM on the CPU, one core
each, prefix caching off) for one connector `Setup`, and measures, all in that run:

- `ttft_loaded_vs_recompute`: decode's TTFT for 1,500-token prompts whose KV prefill stored,
  over its TTFT computing fresh prompts of the same length itself (median of `--repeats`);
- `load_gbps_vs_store_get`: the load's effective GB/s (stored bytes over the load's time in
  the decode engine's log) over the store's own batched get of the same chunks;
- `stall_max_vs_quiet_p50`: a long stream runs on the decode engine while four such prompts
  land on it at once; its largest token gap during the landings over its own median gap
  before them. The same with four fresh prompts the engine must compute is the baseline
  (`stall_max_vs_quiet_p50_recompute`);
- per layer: the layout's scatter (load) and gather (save) of those prompts' KV on a cache of
  the engine's shape, against a memcpy of the same bytes;
- greedy first divergence of `--new-tokens` tokens from the prefill engine's own answer.

Another connector is measured through the same harness by adding a `Setup` to `SETUPS`: how
its engines start and how its decode engine reports a load.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from splitwise_local.bench.report import print_table, write_json

LOAD_LINE = re.compile(r"splitwise load req=\S+ tokens=(\d+) chunks=(\d+) bytes=(\d+) ms=([\d.]+)")
SAVE_KEY = re.compile(r"splitwise save-key req=\S+ tokens=\d+-\d+ key=(\w+)")
LANDINGS = 4
STREAM_TOKENS = 1100
QUIET_TOKENS = 200  # gaps measured before the landings start


@dataclass(frozen=True)
class Setup:
    """One connector configuration under test.

    `start(root, model, args)` returns a running `System` with engines named "prefill" and
    "decode"; `loads(decode_log)` gives (bytes, ms) per load the decode engine logged, empty
    when the connector reports none (its GB/s is then not measured).
    """

    name: str
    start: Callable
    loads: Callable[[str], list[tuple[float, float]]]


def _start_splitwise(root: Path, model: Path, args: argparse.Namespace):
    from splitwise_local.bench.engines import start_system
    from splitwise_local.config import SplitwiseConfig

    config = SplitwiseConfig(
        chunk_size=args.chunk_size, remote_serde=args.serde, max_local_cpu_size=2
    )
    return start_system(root, model, config, {"prefill": "prefill", "decode": "decode"})


def _splitwise_loads(log: str) -> list[tuple[float, float]]:
    return [(float(m[2]), float(m[3])) for m in LOAD_LINE.findall(log)]


SETUPS: dict[str, Setup] = {
    "splitwise": Setup("splitwise", _start_splitwise, _splitwise_loads),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--serde", default="naive", choices=["naive", "kivi", "cachegen"])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--peer", default="splitwise", choices=sorted(SETUPS),
                        help="the connector setup to measure")  # fmt: skip
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


def stream_arrivals(engine, prompt: list[int], max_tokens: int, started: threading.Event):
    """Arrival times of a streamed completion's tokens; `started` is set at the first one."""
    import httpx

    body = {"model": engine.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
    times = []
    with httpx.stream("POST", f"{engine.url}/v1/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and '"text"' in line:
                times.append(time.perf_counter())
                if len(times) == QUIET_TOKENS:
                    started.set()
    return times


def stall_ratio(engine, stream_prompt: list[int], landing: list[list[int]]) -> dict:
    """Largest token gap of a running stream while `landing` prompts arrive, over its median
    gap before they did."""
    started = threading.Event()
    pool = ThreadPoolExecutor(1 + len(landing))
    stream = pool.submit(stream_arrivals, engine, stream_prompt, STREAM_TOKENS, started)
    if not started.wait(120):
        raise RuntimeError("the stream did not start")
    sent = time.perf_counter()
    replies = [pool.submit(engine.complete, p, max_tokens=1) for p in landing]
    for reply in replies:
        reply.result()
    landed = time.perf_counter()
    times = stream.result()
    pool.shutdown()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    quiet = statistics.median(gaps[: QUIET_TOKENS - 1])
    during = [b - a for a, b in itertools.pairwise(times) if b > sent and a < landed]
    if not during or times[-1] < landed:
        raise RuntimeError("the stream ended before the landings did: raise STREAM_TOKENS")
    return {"quiet_p50_ms": quiet * 1e3, "max_gap_ms": max(during) * 1e3,
            "landing_s": landed - sent, "ratio": max(during) / quiet}  # fmt: skip


def layout_costs(tokens: int, model: Path) -> dict:
    """Per-layer scatter and gather of `tokens` tokens' KV on a cache shaped like the engine's."""
    import torch
    from transformers import AutoConfig

    from splitwise_local.connector.layout import LayerCaches, layout_for, slots_for

    torch.set_num_threads(1)
    hf = AutoConfig.from_pretrained(model)
    layers, heads = hf.num_hidden_layers, hf.num_key_value_heads
    head_size, block = hf.hidden_size // hf.num_attention_heads, 128
    blocks = -(-tokens // block) * 2 + 8
    buffer = torch.zeros(layers, blocks, heads, block, 2 * head_size, dtype=torch.bfloat16)
    caches = LayerCaches([buffer[i] for i in range(layers)])
    layout = layout_for(buffer[0], use_mla=False, heads=heads, head_size=head_size,
                        block_size=block)  # fmt: skip
    table = torch.randperm(blocks)[: -(-tokens // block)].tolist()
    slots = slots_for(table, 0, tokens - 1, block)
    rows = torch.randn(layers, 2, len(slots), heads, head_size).bfloat16()
    copy = torch.empty_like(rows)

    def best(action, repeats=7) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return min(times)

    size = rows.numel() * rows.element_size()
    scatter = best(lambda: layout.scatter(caches, slots, rows))
    gather = best(lambda: layout.gather(caches, slots))
    memcpy = best(lambda: copy.copy_(rows))
    return {"isa": getattr(layout, "isa", layout.name), "bytes": size, "layers": layers,
            "scatter_ms_per_layer": scatter / layers * 1e3,
            "gather_ms_per_layer": gather / layers * 1e3,
            "memcpy_ms_per_layer": memcpy / layers * 1e3,
            "scatter_gbps": size / scatter / 1e9, "gather_gbps": size / gather / 1e9,
            "memcpy_gbps": size / memcpy / 1e9}  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from splitwise_local.bench.engines import PROSE
    from splitwise_local.models.hub import resolve_model
    from splitwise_local.progress import Progress

    setup = SETUPS[args.peer]
    model = resolve_model(args.model).folder
    text = AutoTokenizer.from_pretrained(model)(PROSE.read_text(), add_special_tokens=False)
    count = 2 * args.repeats + 2 * LANDINGS + 1
    needed = count * args.prompt_tokens
    tokens = (text["input_ids"] * (needed // len(text["input_ids"]) + 1))[:needed]
    # Every prompt differs from the others from its first token on.
    prompts = [
        [1000 + i, *tokens[i * args.prompt_tokens + 1 : (i + 1) * args.prompt_tokens]]
        for i in range(count)
    ]
    ttft_prompts, landing, fresh = (
        prompts[: 2 * args.repeats],
        prompts[2 * args.repeats : 2 * args.repeats + LANDINGS],
        prompts[2 * args.repeats + LANDINGS : -1],
    )
    stream_prompt = prompts[-1][:64]
    layout = layout_costs(args.prompt_tokens, model)
    root = Path(tempfile.mkdtemp(prefix="splitwise-bench-connector-"))
    print(f"starting {setup.name}: store, prefill and decode engines (logs in {root}) ...")
    system = setup.start(root, model, args)
    try:
        prefill, decode = system.engines["prefill"], system.engines["decode"]
        decode.time_to_first_token(prompts[0][:64])  # warm-up: first request pays one-off costs
        recompute, loaded, loads, divergence = [], [], [], []
        for i in Progress(range(args.repeats), desc="bench connector", unit="prompt"):
            recompute.append(decode.time_to_first_token(ttft_prompts[2 * i]))
            prompt = ttft_prompts[2 * i + 1]
            # The prefill engine's own greedy continuation is the reference (a full forward).
            reference = prefill.complete(prompt, max_tokens=args.new_tokens)
            decode.new_log()
            loaded.append(decode.time_to_first_token(prompt))
            loads += setup.loads(decode.wait_log(LOAD_LINE.pattern))
            got = decode.complete(prompt, max_tokens=args.new_tokens)
            divergence.append(first_divergence(token_ids(got), token_ids(reference)))
        # The last prompt's chunks, as the decode engine just loaded them.
        per_prompt = math.ceil(args.prompt_tokens / args.chunk_size)
        keys = SAVE_KEY.findall(prefill.new_log())[-per_prompt:]
        get_gbps = store_get_gbps(system.backend(), keys) if keys else float("nan")
        for prompt in landing:
            prefill.complete(prompt, max_tokens=1)
        stall_loaded = stall_ratio(decode, stream_prompt, landing)
        stall_recompute = stall_ratio(decode, stream_prompt, fresh)
    finally:
        system.stop()

    recompute_ms = statistics.median(recompute) * 1e3
    loaded_ms = statistics.median(loaded) * 1e3
    moved = statistics.median(size for size, _ in loads) if loads else 0.0
    load_ms = statistics.median(ms for _, ms in loads) if loads else float("nan")
    effective_gbps = moved / (load_ms / 1e3) / 1e9 if loads else float("nan")
    ratios = {
        "ttft_loaded_vs_recompute": loaded_ms / recompute_ms,
        "load_gbps_vs_store_get": effective_gbps / get_gbps if loads and keys else None,
        "stall_max_vs_quiet_p50": stall_loaded["ratio"],
        "stall_max_vs_quiet_p50_recompute": stall_recompute["ratio"],
        "layout_scatter_vs_memcpy": layout["scatter_gbps"] / layout["memcpy_gbps"],
        "layout_gather_vs_memcpy": layout["gather_gbps"] / layout["memcpy_gbps"],
    }
    print_table(
        f"decode TTFT, {args.prompt_tokens}-token prompt, {args.repeats} repeats, "
        f"chunk_size={args.chunk_size}, serde={args.serde}, connector={setup.name}",
        ["case", "TTFT p50 (ms)", "KV bytes", "load (ms)", "GB/s"],
        [
            ["recompute (decode computes the prompt)", recompute_ms, 0, "-", "-"],
            ["loaded from the store", loaded_ms, int(moved), load_ms, effective_gbps],
            ["store get, same chunks (baseline)", "-", "-", "-", get_gbps],
        ],
    )
    print_table(
        f"a {STREAM_TOKENS}-token stream on decode while {LANDINGS} prompts arrive at once",
        ["prompts", "quiet gap p50 (ms)", "max gap (ms)", "landing (s)", "max / quiet"],
        [
            [f"KV loaded ({setup.name})", stall_loaded["quiet_p50_ms"],
             stall_loaded["max_gap_ms"], stall_loaded["landing_s"], stall_loaded["ratio"]],
            ["computed by decode (baseline)", stall_recompute["quiet_p50_ms"],
             stall_recompute["max_gap_ms"], stall_recompute["landing_s"],
             stall_recompute["ratio"]],
        ],
    )  # fmt: skip
    print_table(
        f"layout, {args.prompt_tokens - 1} tokens, {layout['layers']} layers, isa {layout['isa']}",
        ["operation", "ms per layer", "GB/s"],
        [
            ["scatter (load)", layout["scatter_ms_per_layer"], layout["scatter_gbps"]],
            ["gather (save)", layout["gather_ms_per_layer"], layout["gather_gbps"]],
            ["memcpy, same bytes (baseline)", layout["memcpy_ms_per_layer"],
             layout["memcpy_gbps"]],
        ],
    )  # fmt: skip
    print()
    for name, value in ratios.items():
        print(f"{name} = {value:.3f}" if value is not None else f"{name} = n/a")
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
            "stall_loaded": stall_loaded,
            "stall_recompute": stall_recompute,
            "layout": layout,
            "first_divergence": divergence,
            "ratios": ratios,
        },
    )
    return 0
