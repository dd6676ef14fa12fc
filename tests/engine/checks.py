"""Checks shared by the real-engine identity tests (per-head and MLA models)."""

from __future__ import annotations

import re
import warnings

from splitwise_local.bench.engines import Engine

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
