"""Checks shared by the real-engine identity tests (per-head and MLA models)."""

from __future__ import annotations

import re
import warnings

from splitwise_testing.system import Engine

LOAD_LINE = re.compile(
    r"splitwise load req=\S+ tokens=(\d+) chunks=(\d+) bytes=(\d+) .*verified=(\S+)"
)


class References:
    """The plain engine's answers, each prompt run twice; None marks an unstable prompt."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.cache: dict[str, list[int] | None] = {}

    def tokens(self, key: str, ask) -> list[int] | None:
        if key not in self.cache:
            first, second = ask(self.engine), ask(self.engine)
            self.cache[key] = first if first == second else None
            if first != second:
                warnings.warn(f"unstable on a plain engine, left out: {key}", stacklevel=2)
        return self.cache[key]


class Judged:
    """A module's comparisons with a plain engine: those judged, and those left out because the
    plain engine disagreed with itself. `check` fails when fewer than all but `allowed_out` were
    judged, or none was: a check that drops its cases must not pass having judged none."""

    def __init__(self, allowed_out: int) -> None:
        self.allowed_out = allowed_out
        self.judged = 0
        self.left_out: list[str] = []

    def record(self, what: str, stable: bool) -> None:
        if stable:
            self.judged += 1
        else:
            self.left_out.append(what)
            warnings.warn(f"unstable on a plain engine, not judged: {what}", stacklevel=2)

    def check(self) -> None:
        made = self.judged + len(self.left_out)
        if made == 0:
            return  # the module failed or was deselected before it compared anything
        minimum = max(1, made - self.allowed_out)
        assert self.judged >= minimum, (
            f"{self.judged} of {made} comparisons with the plain engine judged, under the "
            f"minimum of {minimum}; left out as unstable: {self.left_out}"
        )


def completion_tokens(reply: dict) -> list[int]:
    return reply["choices"][0]["token_ids"]


def assert_loaded(decode: Engine, prompt_len: int) -> None:
    """The decode engine loaded all but the last prompt token, and read back the same bytes."""
    loads = decode.expect_log(LOAD_LINE.pattern)
    assert loads, "the decode engine loaded nothing from the store"
    tokens, _chunks, size, verified = loads[-1]
    assert int(tokens) == prompt_len - 1
    assert int(size) > 0
    assert verified == "ok"


def first_diff(a: list[int], b: list[int]) -> int:
    pairs = zip(a, b, strict=False)
    return next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(a), len(b)))


# Two tokens whose log-probabilities are this close are a tie in bf16 (its logits carry 8 bits
# of mantissa: a logit near 20 moves in steps of 0.08).
NEAR_TIE_NATS = 0.15


class Reference:
    """A plain engine's greedy answer with each step's two best tokens (id -> logprob)."""

    def __init__(self, tokens: list[int], top: list[dict[int, float]]) -> None:
        self.tokens = tokens
        self.top = top

    @classmethod
    def of(cls, reply: dict) -> Reference:
        choice = reply["choices"][0]
        top = [
            {int(k.removeprefix("token_id:")): v for k, v in step.items()}
            for step in choice["logprobs"]["top_logprobs"]
        ]
        return cls(choice["token_ids"], top)

    def near_tie_at(self, index: int, other: int) -> float | None:
        """The gap when `other` is the runner-up at `index`, within `NEAR_TIE_NATS`."""
        ranked = sorted(self.top[index].items(), key=lambda item: -item[1])
        if len(ranked) < 2 or ranked[1][0] != other:
            return None
        gap = ranked[0][1] - ranked[1][1]
        return gap if gap <= NEAR_TIE_NATS else None


def reference_reply(engine: Engine, prompt, max_tokens: int) -> dict:
    return engine.complete(prompt, max_tokens=max_tokens, logprobs=2,
                           return_tokens_as_token_ids=True)  # fmt: skip


def assert_matches(got: list[int], reference: Reference, what: str) -> None:
    """Equal to the plain engine's answer, or parting from it only where the plain engine
    itself had a bf16 tie for the best token, to its runner-up (reported, not judged): an
    engine that computes part of a prompt in a smaller forward than the plain engine's can
    round such a tie the other way; wrong KV parts at clear margins."""
    index = first_diff(got, reference.tokens)
    if index == min(len(got), len(reference.tokens)):
        return
    gap = reference.near_tie_at(index, got[index])
    assert gap is not None, f"{what}: diverged from the plain engine at token {index}"
    warnings.warn(f"{what}: parted at token {index}, a near tie ({gap:.3f} nats)", stacklevel=2)
