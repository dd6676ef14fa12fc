"""Benchmark workloads: which prompts, of what length, asking for how many tokens, sent when.

Prompts are windows of the prose the project ships (`splitwise_local/data/prose.txt`), cut to an
exact token count with the served model's own tokenizer: a window is kept only if its decoded
text tokenizes back to exactly the length asked for, so the server sees the lengths the workload
names (the load generator checks them again against the server's usage counts). All randomness
comes from one seed, split into independent streams for prompts, arrivals and warm-up, so the same
seed gives the same prompts and, at the same rate, the same arrival times: two systems measured
with one seed see the same load.

The workloads: `fixed` (one prompt and output length; with a short prompt, the short-prompt
workload of conditional disaggregation), `mixed` (short chats decoding while long prompts
arrive: the Splitwise interference case), `shared-prefix` (groups of requests share a long
prefix, e.g. a system prompt) and `multi-turn` (conversations whose every turn resends the
whole history: what prefix caching and KV-aware routing are for). Public traces are replayed
by traces.py with the same prompt cutter and request specs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Literal, Protocol

import numpy as np

WorkloadKind = Literal["fixed", "mixed", "shared-prefix", "multi-turn"]
WORKLOADS: tuple[WorkloadKind, ...] = ("fixed", "mixed", "shared-prefix", "multi-turn")
CORPUS_FILE = "prose.txt"
# A window whose text does not round-trip (a merge across its edges) is rare (~1%); this many
# misses in a row means the tokenizer cannot produce the length at all.
MAX_CUT_ATTEMPTS = 200
PROMPT_STREAM, ARRIVAL_STREAM, WARMUP_STREAM = 0, 1, 2


class WorkloadError(ValueError):
    """A workload that cannot be built as asked; the message says which setting and why."""


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the workloads use."""

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def decode(self, token_ids: Sequence[int], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class WorkloadSettings:
    """The knobs of all the workloads; each workload reads the ones it needs."""

    kind: WorkloadKind = "mixed"
    num_requests: int = 32
    # fixed and mixed-short prompts; the unique suffix in shared-prefix; in multi-turn the new
    # question of each turn after the first
    prompt_len: int = 128
    output_len: int = 64
    long_prompt_len: int = 1024  # mixed: long-prompt requests that arrive while others decode
    long_output_len: int = 16
    long_fraction: float = 0.25
    # shared-prefix: tokens every request of a group shares; multi-turn: the first turn's prompt
    prefix_len: int = 512
    num_prefixes: int = 4
    turns: int = 4  # multi-turn: turns per conversation
    seed: int = 0

    def shapes(self) -> list[tuple[int, int]]:
        """(prompt tokens, output tokens) of every request kind this workload sends."""
        if self.kind == "fixed":
            return [(self.prompt_len, self.output_len)]
        if self.kind == "mixed":
            return [
                (self.prompt_len, self.output_len),
                (self.long_prompt_len, self.long_output_len),
            ]
        if self.kind == "shared-prefix":
            return [(self.prefix_len + self.prompt_len, self.output_len)]
        return [(self.turn_len(turn), self.output_len) for turn in range(self.turns)]

    def turn_len(self, turn: int) -> int:
        """multi-turn: prompt tokens of turn `turn` (0-based): the first prompt, then for each
        earlier turn its answer (output_len tokens) and the next question (prompt_len)."""
        return self.prefix_len + turn * (self.output_len + self.prompt_len)

    def conversations(self) -> int:
        """multi-turn: conversations needed to send num_requests turns."""
        return -(-self.num_requests // self.turns)

    def validate(self, max_model_len: int | None = None) -> None:
        """Raises WorkloadError naming the first setting that cannot work."""
        if self.kind not in WORKLOADS:
            raise WorkloadError(f"unknown workload {self.kind!r}; expected one of {WORKLOADS}")
        positive = {
            "num_requests": self.num_requests,
            "prompt_len": self.prompt_len,
            "output_len": self.output_len,
            "long_prompt_len": self.long_prompt_len,
            "long_output_len": self.long_output_len,
            "prefix_len": self.prefix_len,
            "num_prefixes": self.num_prefixes,
            "turns": self.turns,
        }
        for name, value in positive.items():
            if value < 1:
                raise WorkloadError(f"{name} must be at least 1 (got {value})")
        if not 0.0 <= self.long_fraction <= 1.0:
            raise WorkloadError(f"long_fraction must be within [0, 1] (got {self.long_fraction})")
        if max_model_len is not None:
            for prompt, output in self.shapes():
                if prompt + output > max_model_len:
                    raise WorkloadError(
                        f"{prompt} prompt + {output} output tokens exceed the server's "
                        f"max_model_len of {max_model_len}"
                    )


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: its text and the exact token counts it must produce."""

    index: int
    # "fixed", "short", "long", "shared-prefix", "turn-N" (multi-turn, 1-based) or a trace's name
    kind: str
    prompt: str | tuple[int, ...]  # text, or token ids (trace blocks that must be exact)
    prompt_len: int
    output_len: int
    conversation: int | None = None  # multi-turn: which conversation this turn belongs to
    trace_row: int | None = None  # a trace replay: the request's row in the trace

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_corpus() -> str:
    return resources.files("splitwise_local.data").joinpath(CORPUS_FILE).read_text("utf-8")


def streams(seed: int) -> list[np.random.Generator]:
    """Independent generators for prompts, arrivals and warm-up, from one seed."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]


class PromptCutter:
    """Cuts prompts of an exact token length out of the corpus, at random places."""

    def __init__(self, tokenizer: Tokenizer, corpus: str, rng: np.random.Generator) -> None:
        self._tokenizer = tokenizer
        pool: list[int] = tokenizer(corpus, add_special_tokens=False, verbose=False)["input_ids"]
        self._size = len(pool)
        self._ring = pool + pool  # a window may wrap past the end
        self._added = len(tokenizer("")["input_ids"])  # BOS and the like, per prompt
        self._rng = rng

    @property
    def min_length(self) -> int:
        """The shortest prompt it can cut: one token of text after BOS and the like."""
        return self._added + 1

    def count(self, text: str) -> list[int]:
        """The token ids the server will see for `text` (special tokens included)."""
        return self._tokenizer(text)["input_ids"]

    def cut(self, length: int, prefix: str = "") -> str:
        """Text of exactly `length` tokens that starts with `prefix` (whose tokens it keeps)."""
        prefix_ids = self.count(prefix) if prefix else []
        body = length - (len(prefix_ids) if prefix else self._added)
        if body < 1:
            raise WorkloadError(f"cannot cut a {length}-token prompt: it leaves no text")
        if body > self._size:
            raise WorkloadError(
                f"cannot cut {body} tokens from a {self._size}-token corpus ({CORPUS_FILE})"
            )
        for _ in range(MAX_CUT_ATTEMPTS):
            start = int(self._rng.integers(self._size))
            text = prefix + self._tokenizer.decode(self._ring[start : start + body])
            ids = self.count(text)
            if len(ids) == length and ids[: len(prefix_ids)] == prefix_ids:
                return text
        raise WorkloadError(f"no window of the corpus tokenizes to exactly {length} tokens")


def build_workload(
    settings: WorkloadSettings, tokenizer: Tokenizer, corpus: str | None = None
) -> list[RequestSpec]:
    """The requests of one run, in arrival order."""
    settings.validate()
    rng = streams(settings.seed)[PROMPT_STREAM]
    cutter = PromptCutter(tokenizer, load_corpus() if corpus is None else corpus, rng)
    n = settings.num_requests
    specs: list[RequestSpec] = []
    if settings.kind == "fixed":
        for i in range(n):
            prompt = cutter.cut(settings.prompt_len)
            specs.append(RequestSpec(i, "fixed", prompt, settings.prompt_len, settings.output_len))
    elif settings.kind == "mixed":
        # An exact count of long requests (not a coin per request), at seeded positions.
        n_long = round(n * settings.long_fraction)
        kinds = np.array(["long"] * n_long + ["short"] * (n - n_long))
        rng.shuffle(kinds)
        for i, kind in enumerate(kinds):
            if kind == "long":
                shape = (settings.long_prompt_len, settings.long_output_len)
            else:
                shape = (settings.prompt_len, settings.output_len)
            specs.append(RequestSpec(i, str(kind), cutter.cut(shape[0]), *shape))
    elif settings.kind == "shared-prefix":
        prefixes = [cutter.cut(settings.prefix_len) for _ in range(settings.num_prefixes)]
        total = settings.prefix_len + settings.prompt_len
        for i in range(n):
            prefix = prefixes[int(rng.integers(len(prefixes)))]
            prompt = cutter.cut(total, prefix=prefix)
            specs.append(RequestSpec(i, "shared-prefix", prompt, total, settings.output_len))
    else:
        specs = _multi_turn(settings, cutter)
    return specs


def _multi_turn(settings: WorkloadSettings, cutter: PromptCutter) -> list[RequestSpec]:
    """Conversations whose turn t+1 is turn t's prompt, a stand-in for its answer and a new
    question. The stand-in is corpus text of the answer's length, not the model's own words, so
    the prompts are fixed before the run and every system sees the same tokens; what a KV cache
    can reuse (the whole previous prompt) is the same as in a real chat. Turns are sent round
    robin over the conversations (turn 1 of each, then turn 2 of each, ...), so at rate r a
    conversation's next turn arrives about conversations/r seconds after its last one."""
    count = settings.conversations()
    histories: list[str] = [""] * count
    specs: list[RequestSpec] = []
    for turn in range(settings.turns):
        for conversation in range(count):
            if len(specs) == settings.num_requests:
                return specs
            length = settings.turn_len(turn)
            prompt = cutter.cut(length, prefix=histories[conversation])
            histories[conversation] = prompt
            specs.append(
                RequestSpec(
                    len(specs), f"turn-{turn + 1}", prompt, length, settings.output_len,
                    conversation,
                )
            )  # fmt: skip
    return specs


def warmup_requests(
    settings: WorkloadSettings, tokenizer: Tokenizer, count: int, output_len: int = 8
) -> list[RequestSpec]:
    """Short requests from their own random stream, so they warm the server without putting
    the measured prompts into its prefix cache."""
    if count < 1:
        return []
    cutter = PromptCutter(tokenizer, load_corpus(), streams(settings.seed)[WARMUP_STREAM])
    return [
        RequestSpec(i, "warmup", cutter.cut(settings.prompt_len), settings.prompt_len, output_len)
        for i in range(count)
    ]


def poisson_arrivals(num_requests: int, rate: float, seed: int) -> list[float]:
    """Send times in seconds from the start: the first at 0, then exponential gaps of mean
    1/rate (a Poisson process), drawn from the seed's arrival stream."""
    if rate <= 0:
        raise WorkloadError(f"rate must be positive (got {rate})")
    gaps = streams(seed)[ARRIVAL_STREAM].exponential(1.0 / rate, size=max(num_requests - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num_requests]
