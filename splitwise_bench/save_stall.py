"""`bench save_stall`: what a store slow to write costs decode steps.

One decode engine that also saves what it computes (kv_both, as the launcher runs it), on a
store whose writes can be held (`splitwise_testing/slow_store.py`). A stream runs on the engine;
once it has given `--quiet` tokens, `--landings` fresh prompts arrive one after another, each
computed by the engine (so each is saved) while the stream goes on. The same is done with the
store answering at once ("quick") and with every write held `--slow-write-s` ("slow"),
alternately, `--repeats` times each, on the same engine with prompts of the same length.

A step that computes a prompt is longer than a decode step whatever the store does; what the
store costs the stream is the difference between the phases:

- `ratios.max_gap_slow_vs_quick`: the stream's largest token gap while prompts land, slow over
  quick (median over repeats); 1.0 means a slow store costs decode nothing;
- `ratios.landing_step_p50_slow_vs_quick`: the same for the median of the `--landings` longest
  gaps (the steps that computed the prompts), steadier than the maximum on a busy machine;
- `extra_gap_ms`: both as differences (the goal: at most 20 ms);
- with `--baseline`, the same on an engine whose saves wait for the store (up to 2 s, as they
  once did), to show what the measurement sees when saves do stall decode;
- per phase, the quiet median gap before the landings and how many gaps during them exceed
  that median plus 20 ms, and the chunks the connector dropped rather than wait for the store.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from splitwise_bench.report import print_table, write_json
from splitwise_bench.stall import disturbed_stream
from splitwise_local.config import SplitwiseConfig
from splitwise_local.models.checkpoint import prepare_default_model
from splitwise_testing.slow_store import slow_store
from splitwise_testing.system import PROSE, Engine, start_system

Prompts = Iterator[list[int]]


def one_phase(engine: Engine, prompts: Prompts, args: argparse.Namespace) -> dict:
    """The stream's gaps before and while `args.landings` fresh prompts are computed."""
    stream_prompt, landings = next(prompts), [next(prompts) for _ in range(args.landings)]
    dropped = engine.metric("splitwise:save_dropped_total")

    def land() -> None:
        for prompt in landings:
            engine.complete(prompt, max_tokens=1)

    gaps = disturbed_stream(
        engine.url, engine.model, stream_prompt, args.stream_tokens, args.quiet, land
    )
    steps = sorted(gaps.during)[-args.landings :]  # the steps that computed the landing prompts
    return {
        "quiet_p50_ms": gaps.quiet_p50 * 1e3,
        "max_gap_ms": max(gaps.during) * 1e3,
        "landing_step_p50_ms": statistics.median(steps) * 1e3,
        "gaps_over_quiet_p50_plus_20ms": sum(gap > gaps.quiet_p50 + 0.02 for gap in gaps.during),
        "landing_s": gaps.disturbance_s,
        "saves_dropped": engine.metric("splitwise:save_dropped_total") - dropped,
    }


def fresh_prompts(model: Path, length: int) -> Prompts:
    """Prompts of `length` tokens sharing no chunk (each starts with a token of its own)."""
    from transformers import AutoTokenizer  # heavy: imported by a run, not by `bench --help`

    tokens = AutoTokenizer.from_pretrained(model)(PROSE.read_text(), add_special_tokens=False)
    ids = tokens["input_ids"]
    for k in itertools.count():
        start = k * 1009 % (len(ids) - length)
        yield [9000 + k, *ids[start + 1 : start + length]]


def measure(
    root: Path,
    model: Path,
    store_url: str,
    delay: Path,
    extra: dict,
    prompts: Prompts,
    args: argparse.Namespace,
) -> dict[str, list[dict]]:
    """Quick and slow phases, alternately, on one fresh engine with `extra` connector settings;
    `prompts` never repeats a prompt, so no landing finds its KV in the store."""
    config = SplitwiseConfig(chunk_size=args.chunk, remote_url=store_url)
    engine_args = ["--dtype", args.dtype] if args.dtype else []
    system = start_system(root, model, config, {"decode": "both"}, extra, transport="remote",
                          engine_args={"decode": engine_args})  # fmt: skip
    try:
        engine = system.engines["decode"]
        engine.complete(next(prompts), max_tokens=2)  # warm up
        runs: dict[str, list[dict]] = {"quick": [], "slow": []}
        for _ in range(args.repeats):
            for name, seconds in (("quick", 0.0), ("slow", args.slow_write_s)):
                delay.write_text(str(seconds))
                runs[name].append(one_phase(engine, prompts, args))
                delay.write_text("0")
                time.sleep(args.slow_write_s * args.landings + 1)  # held writes land first
    finally:
        system.stop()
    return runs


def results(args: argparse.Namespace) -> dict:
    """Every setup's phases, their medians, and the ratios and differences slow vs quick."""
    model = Path(args.model) if args.model else prepare_default_model()
    root = Path(tempfile.mkdtemp(prefix="save-stall-"))
    delay = root / "delay"
    delay.write_text("0")
    # "waiting": the engine waits for its saves (up to 2 s, as the connector once did on every
    # engine), the baseline that shows what the measurement sees when saves do stall decode.
    setups = {"async": {}, **({"waiting": {"save_answer_wait_s": 2.0}} if args.baseline else {})}
    results: dict[str, dict] = {}
    prompts = fresh_prompts(model, args.prompt_tokens)
    with slow_store(delay, "--max-size-gb", "2") as store:
        for name, extra in setups.items():
            runs = measure(root / name, model, store.shm_url, delay, extra, prompts, args)
            summary = {
                phase: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
                for phase, rs in runs.items()
            }
            results[name] = {"phases": summary, "runs": runs}
    ratios, extra_ms = {}, {}
    for name, result in results.items():
        suffix = "" if name == "async" else f"_{name}"
        for stat in ("max_gap_ms", "landing_step_p50_ms"):
            quick, slow = (result["phases"][phase][stat] for phase in ("quick", "slow"))
            ratios[f"{stat.removesuffix('_ms')}_slow_vs_quick{suffix}"] = slow / quick
            extra_ms[f"{name} {stat}"] = slow - quick
    return {"benchmark": "save_stall", "settings": vars(args), "ratios": ratios,
            "extra_gap_ms": extra_ms, "setups": results}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--dtype", default="float32", help="engine dtype ('' for its default)")
    parser.add_argument("--chunk", type=int, default=256, help="chunk_size in tokens")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--landings", type=int, default=3)
    parser.add_argument("--stream-tokens", type=int, default=400)
    parser.add_argument("--quiet", type=int, default=32, help="stream tokens before landings")
    parser.add_argument("--slow-write-s", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--baseline", action="store_true", help="also measure an engine whose saves wait"
    )


def run(args: argparse.Namespace) -> int:
    found = results(args)
    rows = [
        [setup, name, p["quiet_p50_ms"], p["landing_step_p50_ms"], p["max_gap_ms"],
         p["gaps_over_quiet_p50_plus_20ms"], p["saves_dropped"]]
        for setup, result in found["setups"].items()
        for name, p in result["phases"].items()
    ]  # fmt: skip
    print_table(
        "decode stream while prompts are computed and saved (medians over repeats)",
        ["saves", "writes", "quiet p50 ms", "landing step ms", "max gap ms", "gaps > p50+20ms",
         "dropped"],
        rows,
    )  # fmt: skip
    for what, extra_ms in found["extra_gap_ms"].items():
        print(f"{what}: a store slow to write adds {extra_ms:+.1f} ms")
    write_json(args.json, found)
    if not args.json:
        print(json.dumps(found["ratios"]))
    return 0
