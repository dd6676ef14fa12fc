"""Public request traces, replayed at a scale this machine can serve.

The traces and their formats are in trace_files.py. A replay sends each request of a window of
the trace at its own arrival time, with its own lengths, scaled by two factors:

- the length scale L multiplies prompt and output lengths (rounded, at least one token); a
  prompt that then does not fit the model beside its output is cut to `max_model_len - output`
  (an output longer than the model allows is cut first), and both cuts are counted;
- the time scale T is replay seconds per trace second: the window's first request is sent at 0
  and every gap is multiplied by T, so the rate is divided by T while the pattern of the gaps
  (bursts, their coefficient of variation) is the trace's own.

Because every request keeps its own lengths and gap, the whole distributions survive the
scaling, not just their means (the summary reports both sides' quantiles and the gaps' CV).

Prompts: the Azure traces publish no text, so a prompt is shipped prose cut to the exact token
count (workloads.PromptCutter). A Mooncake prompt is token ids, block by block: each hash id
becomes ceil(512 L) ids drawn by a generator seeded with (seed, hash id) from the vocabulary
without its special tokens, so equal ids give equal tokens and the replay shares exactly the
prefixes the trace shares, at the scaled block size; the last block is cut to the prompt's
length.

A Mooncake replay's summary also gives the ideal prefix reuse of its window (prefix_reuse.py).
A short window of Mooncake's hour holds little of its reuse (a conversation's next turn comes
minutes later): `sessions` F keeps a seeded random share F of its conversations instead, the
prompts that share their first two blocks (every prefix longer than the shared first block
stays inside one), so a long window thinned to what this machine can serve keeps its sharing.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitwise_bench.prefix_reuse import DEFAULT_KV_BYTES_PER_TOKEN, reuse_summary
from splitwise_bench.trace_files import (
    MOONCAKE_BLOCK_TOKENS,
    TRACES,
    TraceError,
    TraceRequest,
    load_trace,
)
from splitwise_bench.workloads import (
    PROMPT_STREAM,
    PromptCutter,
    RequestSpec,
    Tokenizer,
    load_corpus,
    streams,
)

DEFAULT_MAX_MODEL_LEN = 2048  # the launcher's engines' (when the server does not say)
QUANTILES = (10, 50, 90, 99)


@dataclass(frozen=True)
class ReplaySettings:
    """Which part of which trace, and how it is scaled."""

    trace: str
    length_scale: float = 1.0
    time_scale: float = 1.0
    start_s: float = 0.0  # trace seconds
    duration_s: float | None = None  # trace seconds; None: to the end
    max_requests: int | None = None
    seed: int = 0
    sessions: float | None = None  # Mooncake: the share of conversations kept; None: all

    def validate(self) -> None:
        if self.trace not in TRACES:
            raise TraceError(f"unknown trace {self.trace!r}; expected one of {tuple(TRACES)}")
        for name in ("length_scale", "time_scale"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise TraceError(f"{name} must be a positive number (got {value})")
        if self.start_s < 0:
            raise TraceError(f"trace start must be at least 0 s (got {self.start_s})")
        if self.duration_s is not None and self.duration_s <= 0:
            raise TraceError(f"trace duration must be positive (got {self.duration_s})")
        if self.max_requests is not None and self.max_requests < 1:
            raise TraceError(f"requests must be at least 1 (got {self.max_requests})")
        if self.seed < 0:
            raise TraceError(f"a trace replay's seed must be at least 0 (got {self.seed})")
        if self.sessions is not None:
            if not 0 < self.sessions <= 1:
                raise TraceError(f"sessions must be in (0, 1] (got {self.sessions})")
            if TRACES[self.trace].format != "mooncake":
                raise TraceError(f"{self.trace} has no prompt blocks: sessions need Mooncake's")

    def block_tokens(self) -> int | None:
        """Mooncake: tokens per replayed block, ceil(512 L), so a prompt's blocks always hold
        its scaled length."""
        if TRACES[self.trace].format != "mooncake":
            return None
        return math.ceil(MOONCAKE_BLOCK_TOKENS * self.length_scale)


def window(
    requests: Sequence[TraceRequest],
    start_s: float = 0.0,
    duration_s: float | None = None,
    max_requests: int | None = None,
) -> list[TraceRequest]:
    """The requests arriving in [start_s, start_s + duration_s), at most `max_requests`."""
    end = math.inf if duration_s is None else start_s + duration_s
    chosen = [r for r in requests if start_s <= r.arrival_s < end]
    return chosen if max_requests is None else chosen[:max_requests]


def sessions(requests: Sequence[TraceRequest], share: float, seed: int) -> list[TraceRequest]:
    """The requests of a seeded random `share` of the conversations (prompts sharing their
    first two blocks), in their order."""
    keys = sorted({r.hash_ids[:2] for r in requests})
    rng = np.random.default_rng(seed)
    kept = {keys[i] for i in rng.permutation(len(keys))[: max(1, round(share * len(keys)))]}
    return [r for r in requests if r.hash_ids[:2] in kept]


def select(settings: ReplaySettings) -> list[TraceRequest]:
    """The trace requests a replay sends: its window, thinned to its sessions if asked."""
    every: Sequence[TraceRequest] = load_trace(settings.trace)
    if settings.sessions is not None:
        every = sessions(window(every, settings.start_s, settings.duration_s), settings.sessions,
                         settings.seed)  # fmt: skip
    return window(every, settings.start_s, settings.duration_s, settings.max_requests)


@dataclass(frozen=True)
class Replayed:
    """One trace request as the replay sends it."""

    row: int
    arrival_s: float  # replay seconds after the window's first request
    prompt_len: int
    output_len: int
    blocks: tuple[tuple[int, int], ...] = ()  # Mooncake: (hash id, tokens sent of that block)
    prompt_clipped: bool = False
    output_clipped: bool = False


def scale(
    requests: Sequence[TraceRequest],
    length_scale: float,
    time_scale: float,
    max_model_len: int,
    min_prompt: int = 1,
    block_tokens: int | None = None,
) -> list[Replayed]:
    """The window's requests at the replay's scales (module docstring); `min_prompt` is the
    shortest prompt the replay can send."""
    if max_model_len < min_prompt + 1:
        raise TraceError(f"max_model_len {max_model_len} leaves no room for a prompt and a token")
    first = requests[0].arrival_s if requests else 0.0
    replayed = []
    for r in requests:
        output = max(1, round(r.output_len * length_scale))
        output_clipped = output > max_model_len - min_prompt
        output = min(output, max_model_len - min_prompt)
        prompt = max(min_prompt, round(r.input_len * length_scale))
        prompt_clipped = prompt > max_model_len - output
        prompt = min(prompt, max_model_len - output)
        blocks: list[tuple[int, int]] = []
        if block_tokens is not None:
            if prompt > len(r.hash_ids) * block_tokens:
                raise TraceError(
                    f"trace row {r.row}: {prompt} tokens do not fit {len(r.hash_ids)} blocks "
                    f"of {block_tokens}"
                )
            for k, hash_id in enumerate(r.hash_ids):
                if k * block_tokens >= prompt:
                    break
                blocks.append((hash_id, min(block_tokens, prompt - k * block_tokens)))
        replayed.append(
            Replayed(
                r.row, (r.arrival_s - first) * time_scale, prompt, output, tuple(blocks),
                prompt_clipped, output_clipped,
            )
        )  # fmt: skip
    return replayed


class BlockTokens:
    """Token ids of Mooncake blocks: a block is a function of (seed, hash id) alone."""

    def __init__(self, tokenizer: Tokenizer, block_tokens: int, seed: int) -> None:
        special = set(getattr(tokenizer, "all_special_ids", ()))
        self.vocabulary = np.array([i for i in range(len(tokenizer)) if i not in special])
        self.block_tokens = block_tokens
        self.seed = seed
        self._blocks: dict[int, np.ndarray] = {}

    def block(self, hash_id: int) -> np.ndarray:
        if hash_id not in self._blocks:
            rng = np.random.default_rng([self.seed, hash_id])
            picks = rng.integers(len(self.vocabulary), size=self.block_tokens)
            self._blocks[hash_id] = self.vocabulary[picks]
        return self._blocks[hash_id]

    def prompt(self, blocks: Sequence[tuple[int, int]]) -> tuple[int, ...]:
        """The prompt's token ids: each block's tokens, the last one cut to its length."""
        return tuple(int(t) for hash_id, n in blocks for t in self.block(hash_id)[:n])


def _quantiles(values: Sequence[float]) -> dict[str, float | None]:
    if not len(values):
        return {f"p{q}": None for q in QUANTILES} | {"mean": None, "max": None}
    array = np.asarray(values, dtype=float)
    stats = {f"p{q}": float(np.percentile(array, q)) for q in QUANTILES}
    return stats | {"mean": float(array.mean()), "max": float(array.max())}


def interarrival_cv(arrivals_s: Sequence[float]) -> float | None:
    """Coefficient of variation of the gaps between arrivals (1 for Poisson): burstiness."""
    gaps = np.diff(np.asarray(arrivals_s, dtype=float))
    if len(gaps) < 2 or gaps.mean() == 0:
        return None
    return float(gaps.std() / gaps.mean())


def _rate(arrivals_s: Sequence[float]) -> float | None:
    span = arrivals_s[-1] - arrivals_s[0] if len(arrivals_s) > 1 else 0.0
    return (len(arrivals_s) - 1) / span if span > 0 else None


@dataclass
class Replay:
    """A replay ready to send: its requests, their send times and what it reproduces."""

    specs: list[RequestSpec]
    arrivals: list[float]
    replayed: list[Replayed]
    summary: dict[str, Any] = field(default_factory=dict)


def build_replay(
    settings: ReplaySettings,
    tokenizer: Tokenizer,
    max_model_len: int | None = None,
    capacities: Sequence[dict[str, int]] = (),
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN,
) -> Replay:
    """The requests of one replay, in arrival order, with the summary every report carries.
    `capacities` ({"blocks": N} or {"bytes": B}) add the ideal reuse under an LRU of each."""
    settings.validate()
    max_len = max_model_len or DEFAULT_MAX_MODEL_LEN
    chosen = select(settings)
    if not chosen:
        raise TraceError(
            f"no request of {settings.trace} arrives in the window from {settings.start_s} s "
            f"for {settings.duration_s} s"
        )
    block_tokens = settings.block_tokens()
    if capacities and block_tokens is None:
        raise TraceError(f"{settings.trace} has no prompt blocks: ideal reuse needs Mooncake's")
    if block_tokens is None:
        cutter = PromptCutter(tokenizer, load_corpus(), streams(settings.seed)[PROMPT_STREAM])
        min_prompt = cutter.min_length
    else:
        blocks = BlockTokens(tokenizer, block_tokens, settings.seed)
        min_prompt = 1
    replayed = scale(
        chosen, settings.length_scale, settings.time_scale, max_len, min_prompt, block_tokens
    )
    specs = []
    for i, r in enumerate(replayed):
        prompt = cutter.cut(r.prompt_len) if block_tokens is None else blocks.prompt(r.blocks)
        specs.append(
            RequestSpec(i, settings.trace, prompt, r.prompt_len, r.output_len, trace_row=r.row)
        )
    arrivals = [r.arrival_s for r in replayed]
    summary = _summary(settings, chosen, replayed, max_len, block_tokens)
    if block_tokens is not None:
        sent = [r.blocks for r in replayed]
        summary["prefix_reuse"] = reuse_summary(
            chosen, sent, block_tokens, capacities, kv_bytes_per_token
        )
    return Replay(specs, arrivals, replayed, summary)


def _summary(
    settings: ReplaySettings,
    chosen: Sequence[TraceRequest],
    replayed: Sequence[Replayed],
    max_len: int,
    block_tokens: int | None,
) -> dict[str, Any]:
    """What the replay reproduces of the trace: its window, its scales and both sides' shapes."""
    info = TRACES[settings.trace]
    arrivals = [r.arrival_s for r in replayed]
    trace_arrivals = [r.arrival_s for r in chosen]
    return {
        "name": settings.trace,
        "source": info.source,
        "file": info.file,
        "length_scale": settings.length_scale,
        "time_scale": settings.time_scale,
        "window": {
            "start_s": settings.start_s,
            "duration_s": settings.duration_s,
            "max_requests": settings.max_requests,
            "sessions": settings.sessions,
            "requests": len(chosen),
            "first_row": chosen[0].row,
            "last_row": chosen[-1].row,
            "trace_span_s": trace_arrivals[-1] - trace_arrivals[0],
            "replay_span_s": arrivals[-1],
        },
        "max_model_len": max_len,
        "block_tokens": block_tokens,
        "seed": settings.seed,
        "clipped": {
            "prompts": sum(r.prompt_clipped for r in replayed),
            "outputs": sum(r.output_clipped for r in replayed),
        },
        "shape": {
            "prompt_tokens": {
                "trace": _quantiles([r.input_len for r in chosen]),
                "replay": _quantiles([r.prompt_len for r in replayed]),
            },
            "output_tokens": {
                "trace": _quantiles([r.output_len for r in chosen]),
                "replay": _quantiles([r.output_len for r in replayed]),
            },
            "requests_per_s": {"trace": _rate(trace_arrivals), "replay": _rate(arrivals)},
            "interarrival_cv": {
                "trace": interarrival_cv(trace_arrivals),
                "replay": interarrival_cv(arrivals),
            },
        },
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`bench serve`'s trace flags."""
    group = parser.add_argument_group("trace replay (--trace)")
    group.add_argument(
        "--trace",
        choices=tuple(TRACES),
        help="replay a public trace: arrivals and lengths from it (instead of --workload, "
        "--rate, --concurrency)",
    )
    group.add_argument(
        "--length-scale",
        type=float,
        default=1.0,
        help="multiplies prompt and output lengths (Mooncake blocks: ceil(512 x this) tokens)",
    )
    group.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="replay seconds per trace second (10: a tenth of the trace's rate, same bursts)",
    )
    group.add_argument(
        "--trace-start", type=float, default=0.0, metavar="S", help="first trace second to replay"
    )
    group.add_argument(
        "--trace-duration", type=float, metavar="S", help="trace seconds to replay (default: all)"
    )
    group.add_argument(
        "--requests", type=int, metavar="N", help="at most the window's first N requests"
    )
    group.add_argument(
        "--trace-sessions",
        type=float,
        metavar="F",
        help="Mooncake: keep a random share F of the window's conversations (prompts sharing "
        "their first two blocks; --seed picks them), so a thinned window keeps its reuse",
    )
    group.add_argument(
        "--ideal-capacity-blocks",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="Mooncake: also report the ideal prefix reuse under an LRU of N replayed blocks",
    )
    group.add_argument(
        "--ideal-capacity-bytes",
        type=int,
        action="append",
        default=[],
        metavar="B",
        help="the same for a store of B bytes of KV (see --kv-bytes-per-token)",
    )
    group.add_argument(
        "--kv-bytes-per-token",
        type=int,
        default=DEFAULT_KV_BYTES_PER_TOKEN,
        help="KV bytes of one token, for --ideal-capacity-bytes (default: SmolLM2-135M, bf16)",
    )


def settings_from_args(args: argparse.Namespace) -> ReplaySettings:
    return ReplaySettings(
        trace=args.trace,
        length_scale=args.length_scale,
        time_scale=args.time_scale,
        start_s=args.trace_start,
        duration_s=args.trace_duration,
        max_requests=args.requests,
        seed=args.seed,
        sessions=args.trace_sessions,
    )


def capacities_from_args(args: argparse.Namespace) -> list[dict[str, int]]:
    for value in (*args.ideal_capacity_blocks, *args.ideal_capacity_bytes):
        if value < 1:
            raise TraceError(f"an ideal-reuse capacity must be at least 1 (got {value})")
    if args.kv_bytes_per_token < 1:
        raise TraceError(f"kv bytes per token must be at least 1 (got {args.kv_bytes_per_token})")
    return [{"blocks": n} for n in args.ideal_capacity_blocks] + [
        {"bytes": n} for n in args.ideal_capacity_bytes
    ]
