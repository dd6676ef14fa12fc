"""`bench prefill`: does the launched system prefill as fast as this CPU allows?

The engine dtype is chosen per CPU (`hardware/dtype.py`: bf16 where AMX or AVX512-BF16 make it
fast, fp32 where vLLM's bf16 linears fall back to torch). This measures the result: prefill
tokens/s of a plain bf16 engine and a plain fp32 engine, each alone on core 0, and of the
launched system's prefill engine (the whole system, as `python -m splitwise_local` starts it,
with its connector saving to the store), on the same prompts. Prefill time is a completion's
wall time with `max_tokens=1`; each prompt is a fresh window of the shipped prose, prefix caching
off, after one warm-up request. `ratios.launched_vs_best_plain` is the launched engine's
tokens/s over the faster plain engine's (goal: >= 0.8).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from splitwise_bench.report import print_table, write_json
from splitwise_local.hardware.dtype import DTYPES, cpu_dtype
from splitwise_local.models.hub import resolve_model
from splitwise_local.progress import Progress
from splitwise_testing.launch import launch_system, sweep
from splitwise_testing.system import PROSE, start_system

HEALTH_DEADLINE_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=1100, help="prompt length (default 1100)")
    parser.add_argument("--repeats", type=int, default=3, help="prompts per engine (default 3)")
    parser.add_argument("--model", help="checkpoint folder (default: the embedded SmolLM2)")


def prompts(folder: Path, tokens: int, count: int) -> list[list[int]]:
    """`count` distinct windows of the shipped prose, `tokens` tokens each (the first one is
    the warm-up)."""
    from transformers import AutoTokenizer  # heavy: imported by a run, not by `bench --help`

    ids = AutoTokenizer.from_pretrained(folder)(PROSE.read_text(), add_special_tokens=False)
    ids = ids["input_ids"]
    step = max(1, (len(ids) - tokens) // max(1, count))
    windows = [ids[i * step : i * step + tokens] for i in range(count)]
    if any(len(w) < tokens for w in windows):
        raise SystemExit(f"the prose has too few tokens for {count} prompts of {tokens}")
    return windows


def prefill_seconds(url: str, model: str, windows: list[list[int]]) -> list[float]:
    """Seconds per prompt after a warm-up (the first window)."""

    def complete(prompt: list[int]) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()

    complete(windows[0])
    seconds = []
    for prompt in windows[1:]:
        started = time.perf_counter()
        complete(prompt)
        seconds.append(time.perf_counter() - started)
    return seconds


def plain(root: Path, folder: Path, dtype: str, windows: list[list[int]]) -> list[float]:
    """A plain engine (no connector) on core 0 in `dtype`."""
    system = start_system(root / dtype, folder, None, {"plain": "plain"},
                          engine_args={"plain": ["--dtype", dtype]})  # fmt: skip
    try:
        engine = system.engines["plain"]
        return prefill_seconds(engine.url, engine.model, windows)
    finally:
        system.stop()


def launched(root: Path, folder: Path, windows: list[list[int]]) -> list[float]:
    """The launched system's prefill engine, asked directly (the proxy adds nothing to it)."""
    system = launch_system(root / "launched", HEALTH_DEADLINE_S, ["--model", str(folder)])
    try:
        url = f"http://127.0.0.1:{system.ports['prefill engine']}"
        return prefill_seconds(url, system.model, windows)
    finally:
        system.launch.stop()
        sweep(system.launch.run_dir)


def run(args: argparse.Namespace) -> int:
    folder = resolve_model(args.model).folder
    windows = prompts(folder, args.tokens, args.repeats + 1)
    choice = cpu_dtype()
    root = Path(tempfile.mkdtemp(prefix="splitwise-bench-prefill-"))
    print(f"prefill of {args.tokens} tokens, {args.repeats} prompts per engine (logs in {root})")
    seconds: dict[str, list[float]] = {}
    for name in Progress([*DTYPES, "launched"], desc="bench prefill", unit="engine"):
        if name == "launched":
            seconds[name] = launched(root, folder, windows)
        else:
            seconds[name] = plain(root, folder, name, windows)
    rate = {name: args.tokens / statistics.median(values) for name, values in seconds.items()}
    best = max(DTYPES, key=lambda name: rate[name])
    rows = [[name, statistics.median(v), min(v), max(v), rate[name]] for name, v in seconds.items()]
    print_table(
        f"prefill of {args.tokens} tokens, one core (launched: dtype {choice.dtype})",
        ["engine", "median s", "min s", "max s", "tokens/s"],
        rows,
    )
    ratios = {
        "launched_vs_best_plain": rate["launched"] / rate[best],
        "bfloat16_vs_float32": rate["bfloat16"] / rate["float32"],
    }
    print(f"launched / best plain ({best}): {ratios['launched_vs_best_plain']:.3f} (goal >= 0.8)")
    write_json(
        args.json,
        {
            "settings": vars(args) | {"json": None},
            "dtype_choice": {"dtype": choice.dtype, "reason": choice.reason},
            "seconds": seconds,
            "tokens_per_s": rate,
            "best_plain": best,
            "ratios": ratios,
        },
    )
    return 0
