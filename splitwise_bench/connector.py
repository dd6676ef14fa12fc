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

`--peer NAME` runs another connector setup (connector_setups.py: vLLM's `example` and `nixl`)
after ours on the same prompts, each on fresh engines, and adds the comparison to `ratios`
(`ttft_ours_vs_NAME`: our loaded TTFT over the peer's, below 1 when ours is faster).
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from splitwise_bench.connector_setups import SETUPS, Load, Setup, kv_geometry
from splitwise_bench.report import print_table, write_json
from splitwise_bench.stall import disturbed_stream
from splitwise_local.models.hub import resolve_model
from splitwise_local.progress import Progress
from splitwise_local.store.backend import KVBackend
from splitwise_testing.system import PROSE, Engine, System

SAVE_KEY = re.compile(r"splitwise save-key req=\S+ tokens=\d+-\d+ key=(\w+)")
LANDINGS = 4
STREAM_TOKENS = 1100
QUIET_TOKENS = 200  # gaps measured before the landings start
WARMUP_TOKENS = 256  # two blocks: every setup's load path runs once before the measurements


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--serde", default="naive", choices=["naive", "kivi", "cachegen"])
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument(
        "--peer", default="splitwise", choices=sorted(SETUPS),
        help="a connector setup to measure after ours, on the same prompts",
    )  # fmt: skip
    parser.add_argument(
        "--stall", action=argparse.BooleanOptionalAction, default=True,
        help="measure the stall of a running stream (--no-stall: TTFT only)",
    )  # fmt: skip
    parser.add_argument(
        "--new-tokens", type=int, default=64, help="greedy tokens compared for divergence"
    )
    parser.add_argument(
        "--stream-tokens", type=int, default=STREAM_TOKENS,
        help=f"tokens of the stream the stall is measured on (it must outlast the landings; "
        f"the first {QUIET_TOKENS} are its quiet gaps)",
    )  # fmt: skip


def token_ids(reply: dict) -> list[int]:
    return reply["choices"][0]["token_ids"]


def first_divergence(got: list[int], expected: list[int]) -> int:
    """Index of the first differing greedy token; the length when all agree."""
    pairs = zip(got, expected, strict=False)
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(expected)))


def store_get_gbps(backend: KVBackend, keys: list[str], repeats: int = 5) -> float:
    """The store's own throughput for the same chunks, fetched in one batch, in GB/s."""
    best = float("inf")
    size = 0
    for _ in range(repeats):
        started = time.perf_counter()
        values = backend.get_many(keys)
        best = min(best, time.perf_counter() - started)
        size = sum(len(v) for v in values if v is not None)
    return size / best / 1e9


def stall_ratio(
    engine: Engine,
    stream_prompt: list[int],
    landing: list[list[int]],
    extras: list[dict],
    stream_tokens: int,
) -> dict:
    """Largest token gap of a running stream while `landing` prompts arrive at once (each
    request with its `extras` fields), over its median gap before they did."""

    def land() -> None:
        with ThreadPoolExecutor(len(landing)) as pool:
            sent = [
                pool.submit(engine.complete, p, max_tokens=1, **extra)
                for p, extra in zip(landing, extras, strict=True)
            ]
            for reply in sent:
                reply.result()

    gaps = disturbed_stream(
        engine.url, engine.model, stream_prompt, stream_tokens, QUIET_TOKENS, land, 120
    )
    worst = max(gaps.during)
    return {"quiet_p50_ms": gaps.quiet_p50 * 1e3, "max_gap_ms": worst * 1e3,
            "landing_s": gaps.disturbance_s, "ratio": worst / gaps.quiet_p50}  # fmt: skip


def layout_costs(tokens: int, model: Path) -> dict:
    """Per-layer scatter and gather of `tokens` tokens' KV on a cache shaped like the engine's."""
    # Heavy (torch, vLLM): imported by a run, not by `bench --help`.
    import torch
    from vllm.v1.kv_cache_layout import KVCacheLayout

    from splitwise_local.connector.layout import LayerCaches, layout_for, slots_for

    torch.set_num_threads(1)
    layers, heads, head_size = kv_geometry(model)
    block = 128
    blocks = -(-tokens // block) * 2 + 8
    buffer = torch.zeros(layers, blocks, heads, block, 2 * head_size, dtype=torch.bfloat16)
    caches = LayerCaches([buffer[i] for i in range(layers)])
    layout = layout_for(buffer[0], kv_cache_layout=KVCacheLayout.LBHNC, use_mla=False,
                        heads=heads, head_size=head_size, block_size=block)  # fmt: skip
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


@dataclass(frozen=True)
class Prompts:
    """The prompts of one run, the same for every setup measured: pairs for TTFT (recompute,
    loaded), the landings and their fresh twins for the stall, the running stream's prompt,
    and a short one that warms each setup's load path up."""

    ttft: list[list[int]]
    landing: list[list[int]]
    fresh: list[list[int]]
    stream: list[int]
    warmup: list[int]


def make_prompts(model: Path, args: argparse.Namespace) -> Prompts:
    from transformers import AutoTokenizer  # heavy: imported by a run, not by `bench --help`

    text = AutoTokenizer.from_pretrained(model)(PROSE.read_text(), add_special_tokens=False)
    count = 2 * args.repeats + 2 * LANDINGS + 2
    needed = count * args.prompt_tokens
    tokens = (text["input_ids"] * (needed // len(text["input_ids"]) + 1))[:needed]
    # Every prompt differs from the others from its first token on.
    prompts = [
        [1000 + i, *tokens[i * args.prompt_tokens + 1 : (i + 1) * args.prompt_tokens]]
        for i in range(count)
    ]
    return Prompts(
        ttft=prompts[: 2 * args.repeats],
        landing=prompts[2 * args.repeats : 2 * args.repeats + LANDINGS],
        fresh=prompts[2 * args.repeats + LANDINGS : -2],
        stream=prompts[-2][:64],
        warmup=prompts[-1][:WARMUP_TOKENS],
    )


def measure(setup: Setup, model: Path, prompts: Prompts, args: argparse.Namespace) -> dict:
    """One setup on fresh engines: TTFT recompute vs loaded, bytes, divergence, stall."""
    root = Path(tempfile.mkdtemp(prefix=f"splitwise-bench-connector-{setup.name}-"))
    print(f"starting {setup.name}: prefill and decode engines (logs in {root}) ...")
    system = setup.start(root, model, args)
    try:
        prefill, decode = system.engines["prefill"], system.engines["decode"]
        # Warm-up: the first request and the first load pay one-off costs (NIXL's handshake).
        prefill.complete(prompts.warmup, max_tokens=1)
        decode.time_to_first_token(prompts.warmup, **setup.handoff(prefill, prompts.warmup))
        found = _ttft_and_loads(setup, system, model, prompts, args)
        stalls = (
            _stalls(setup, prefill, decode, prompts, args.stream_tokens)
            if args.stall
            else (None, None)
        )
    finally:
        system.stop()
    return _summary(setup, found, stalls, args)


@dataclass
class _Found:
    """What one setup's TTFT prompts gave: seconds, loads, divergences, the store's own GB/s."""

    recompute: list[float]
    loaded: list[float]
    loads: list[Load]
    divergence: list[int]
    get_gbps: float | None


def _ttft_and_loads(
    setup: Setup, system: System, model: Path, prompts: Prompts, args: argparse.Namespace
) -> _Found:
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    found = _Found([], [], [], [], None)
    for i in Progress(range(args.repeats), desc=f"bench connector {setup.name}", unit="prompt"):
        found.recompute.append(decode.time_to_first_token(prompts.ttft[2 * i]))
        prompt = prompts.ttft[2 * i + 1]
        # The prefill engine's own greedy continuation is the reference (a full forward).
        reference = prefill.complete(prompt, max_tokens=args.new_tokens)
        extra = setup.handoff(prefill, prompt)
        mark = setup.report.mark(decode)
        found.loaded.append(decode.time_to_first_token(prompt, **extra))
        found.loads += setup.report.loads(decode, model, mark)
        extra = setup.handoff(prefill, prompt)  # a handoff may serve one request only
        got = decode.complete(prompt, max_tokens=args.new_tokens, **extra)
        found.divergence.append(first_divergence(token_ids(got), token_ids(reference)))
    # The last prompt's chunks, as the decode engine just loaded them (our store only).
    per_prompt = math.ceil(args.prompt_tokens / args.chunk_size)
    keys = SAVE_KEY.findall(prefill.new_log())[-per_prompt:]
    found.get_gbps = store_get_gbps(system.backend(), keys) if keys else None
    return found


def _stalls(
    setup: Setup, prefill: Engine, decode: Engine, prompts: Prompts, stream_tokens: int
) -> tuple[dict, dict]:
    """The stream's stall while stored prompts land, and while fresh ones are computed."""
    extras = []
    for prompt in prompts.landing:
        prefill.complete(prompt, max_tokens=1)
        extras.append(setup.handoff(prefill, prompt))
    loaded = stall_ratio(decode, prompts.stream, prompts.landing, extras, stream_tokens)
    fresh = [{} for _ in prompts.fresh]
    return loaded, stall_ratio(decode, prompts.stream, prompts.fresh, fresh, stream_tokens)


def _summary(
    setup: Setup, found: _Found, stalls: tuple[dict | None, dict | None], args: argparse.Namespace
) -> dict:
    loads, (stall_loaded, stall_recompute) = found.loads, stalls
    if len(loads) < args.repeats:
        raise RuntimeError(f"{setup.name}: {len(loads)} loads logged for {args.repeats} prompts")
    moved = statistics.median(load.bytes for load in loads)
    timed = [load.ms for load in loads if load.ms is not None]
    load_ms = statistics.median(timed) if timed else None
    effective_gbps = moved / (load_ms / 1e3) / 1e9 if load_ms else None
    get_gbps = found.get_gbps
    return {
        "recompute_ttft_ms": [t * 1e3 for t in found.recompute],
        "loaded_ttft_ms": [t * 1e3 for t in found.loaded],
        "loaded_tokens": [load.tokens for load in loads],
        "kv_bytes_per_request": moved,
        "load_ms": load_ms,
        "load_gbps": effective_gbps,
        "store_get_gbps": get_gbps,
        "stall_loaded": stall_loaded,
        "stall_recompute": stall_recompute,
        "first_divergence": found.divergence,
        "ratios": {
            "ttft_loaded_vs_recompute": statistics.median(found.loaded)
            / statistics.median(found.recompute),
            "load_gbps_vs_store_get": effective_gbps / get_gbps
            if get_gbps and effective_gbps
            else None,
            "stall_max_vs_quiet_p50": stall_loaded["ratio"] if stall_loaded else None,
            "stall_max_vs_quiet_p50_recompute": stall_recompute["ratio"]
            if stall_recompute
            else None,
        },
    }


def compare(ours: dict, peer: dict, name: str, new_tokens: int) -> dict:
    """Ours against the peer on the same prompts: TTFT ratios (below 1: ours is faster), bytes
    moved, and on the prompts where the peer's tokens diverge, the share where ours do not."""
    ttft = {case: statistics.median(ours[f"{case}_ttft_ms"]) for case in ("loaded", "recompute")}
    peer_ttft = {case: statistics.median(peer[f"{case}_ttft_ms"]) for case in ttft}
    diverged = [i for i, d in enumerate(peer["first_divergence"]) if d < new_tokens]
    return {
        f"ttft_ours_vs_{name}": ttft["loaded"] / peer_ttft["loaded"],
        # The same engine computing the same prompts: how comparable the two runs are (about 1).
        f"recompute_ttft_ours_vs_{name}": ttft["recompute"] / peer_ttft["recompute"],
        f"kv_bytes_ours_vs_{name}": ours["kv_bytes_per_request"] / peer["kv_bytes_per_request"],
        f"ours_identical_where_{name}_diverges": (
            sum(ours["first_divergence"][i] == new_tokens for i in diverged) / len(diverged)
            if diverged
            else None
        ),
    }


def print_results(name: str, result: dict, args: argparse.Namespace) -> None:
    def shown(value):
        return "-" if value is None else value

    print_table(
        f"decode TTFT, {args.prompt_tokens}-token prompt, {args.repeats} repeats, "
        f"connector={name}" + (f", chunk_size={args.chunk_size}, serde={args.serde}"
                               if name == "splitwise" else ""),
        ["case", "TTFT p50 (ms)", "tokens loaded", "KV bytes", "load (ms)", "GB/s"],
        [
            ["recompute (decode computes the prompt)",
             statistics.median(result["recompute_ttft_ms"]), 0, 0, "-", "-"],
            ["KV loaded", statistics.median(result["loaded_ttft_ms"]),
             statistics.median(result["loaded_tokens"]), int(result["kv_bytes_per_request"]),
             shown(result["load_ms"]), shown(result["load_gbps"])],
            ["store get, same chunks (baseline)", "-", "-", "-", "-",
             shown(result["store_get_gbps"])],
        ],
    )  # fmt: skip
    stall_loaded, stall_recompute = result["stall_loaded"], result["stall_recompute"]
    if stall_loaded is not None:
        print_table(
            f"a {args.stream_tokens}-token stream on decode "
            f"while {LANDINGS} prompts arrive at once",
            ["prompts", "quiet gap p50 (ms)", "max gap (ms)", "landing (s)", "max / quiet"],
            [
                [f"KV loaded ({name})", stall_loaded["quiet_p50_ms"],
                 stall_loaded["max_gap_ms"], stall_loaded["landing_s"], stall_loaded["ratio"]],
                ["computed by decode (baseline)", stall_recompute["quiet_p50_ms"],
                 stall_recompute["max_gap_ms"], stall_recompute["landing_s"],
                 stall_recompute["ratio"]],
            ],
        )  # fmt: skip
    print(
        f"{name}: greedy first divergence from a full forward, per prompt: "
        f"{result['first_divergence']} (of {args.new_tokens}; {args.new_tokens} = identical)"
    )


def run(args: argparse.Namespace) -> int:
    model = resolve_model(args.model).folder
    prompts = make_prompts(model, args)
    layout = layout_costs(args.prompt_tokens, model)
    ours = measure(SETUPS["splitwise"], model, prompts, args)
    peer = measure(SETUPS[args.peer], model, prompts, args) if args.peer != "splitwise" else None

    ratios = ours["ratios"] | {
        "layout_scatter_vs_memcpy": layout["scatter_gbps"] / layout["memcpy_gbps"],
        "layout_gather_vs_memcpy": layout["gather_gbps"] / layout["memcpy_gbps"],
    }
    print_results("splitwise", ours, args)
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
    if peer is not None:
        print_results(args.peer, peer, args)
        ratios |= compare(ours, peer, args.peer, args.new_tokens)
    print()
    for name, value in ratios.items():
        print(f"{name} = {value:.3f}" if value is not None else f"{name} = n/a")
    write_json(
        args.json,
        {
            "settings": vars(args) | {"json": None},
            **{key: value for key, value in ours.items() if key != "ratios"},
            "layout": layout,
            **({"peer": {"name": args.peer, **peer}} if peer is not None else {}),
            "ratios": ratios,
        },
    )
    return 0
