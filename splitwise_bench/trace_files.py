"""The public request traces shipped in data/traces/ (with their licenses): what each holds and
how its file parses.

Splitwise's own workload, the Azure LLM inference trace of November 2023 (`azure-conv`,
`azure-code`: arrival time, prompt and output tokens), and Kimi's (`mooncake-conv`, Mooncake
FAST'25: also the ids of each 512-token prompt block, equal ids being equal blocks).
"""

from __future__ import annotations

import csv
import json
import lzma
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np

from splitwise_bench.workloads import WorkloadError

MOONCAKE_BLOCK_TOKENS = 512


class TraceError(WorkloadError):
    """A trace or a replay setting that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class TraceInfo:
    name: str
    file: str
    format: str  # "azure" (CSV) or "mooncake" (JSON lines)
    source: str


TRACES: dict[str, TraceInfo] = {
    info.name: info
    for info in (
        TraceInfo(
            "azure-conv",
            "AzureLLMInferenceTrace_conv.csv.xz",
            "azure",
            "Azure LLM inference trace 2023, conversation (Splitwise, ISCA 2024; CC-BY 4.0)",
        ),
        TraceInfo(
            "azure-code",
            "AzureLLMInferenceTrace_code.csv.xz",
            "azure",
            "Azure LLM inference trace 2023, coding (Splitwise, ISCA 2024; CC-BY 4.0)",
        ),
        TraceInfo(
            "mooncake-conv",
            "mooncake_conversation_trace.jsonl.xz",
            "mooncake",
            "Mooncake FAST'25 conversation trace (Kimi; Apache-2.0)",
        ),
    )
}


@dataclass(frozen=True)
class TraceRequest:
    """One request as the trace records it."""

    row: int  # 0-based, in the file's order
    arrival_s: float  # seconds after the trace's first request
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()  # Mooncake: one id per 512-token prompt block

    def blocks(self) -> list[tuple[int, int]]:
        """(hash id, tokens) of each prompt block as the trace has it (the last one partial)."""
        size = MOONCAKE_BLOCK_TOKENS
        return [(h, min(size, self.input_len - k * size)) for k, h in enumerate(self.hash_ids)]


def parse_azure(lines: Iterable[str]) -> list[TraceRequest]:
    """Rows of an Azure LLM inference CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`)."""
    reader = csv.DictReader(lines)
    columns = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    if not set(columns) <= set(reader.fieldnames or ()):
        raise TraceError(f"an Azure trace needs the columns {columns}, found {reader.fieldnames}")
    try:
        rows = [
            (r["TIMESTAMP"], int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in reader
        ]
        stamps = np.array([np.datetime64(t.strip().replace(" ", "T"), "ns") for t, _, _ in rows])
    except (TypeError, ValueError) as exc:
        raise TraceError(f"malformed Azure trace row: {exc}") from None
    seconds = (stamps - stamps.min()) / np.timedelta64(1, "s") if rows else []
    return [
        TraceRequest(i, float(s), context, generated)
        for i, (s, (_, context, generated)) in enumerate(zip(seconds, rows, strict=True))
    ]


def parse_mooncake(lines: Iterable[str]) -> list[TraceRequest]:
    """Lines of a Mooncake trace (`timestamp` in ms, `input_length`, `output_length`,
    `hash_ids`)."""
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            hash_ids = tuple(int(h) for h in r["hash_ids"])
            records.append((float(r["timestamp"]) / 1e3, int(r["input_length"]),
                            int(r["output_length"]), hash_ids))  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise TraceError(f"malformed Mooncake trace line {number}: {exc!r}") from None
        if len(hash_ids) != math.ceil(records[-1][1] / MOONCAKE_BLOCK_TOKENS):
            raise TraceError(
                f"Mooncake trace line {number}: {len(hash_ids)} hash ids for "
                f"{records[-1][1]} tokens (one per {MOONCAKE_BLOCK_TOKENS})"
            )
    start = min((r[0] for r in records), default=0.0)
    return [TraceRequest(i, t - start, n, o, h) for i, (t, n, o, h) in enumerate(records)]


@cache
def load_trace(name: str) -> tuple[TraceRequest, ...]:
    """The shipped trace `name` (one of TRACES), whole, in arrival order."""
    if name not in TRACES:
        raise TraceError(f"unknown trace {name!r}; expected one of {tuple(TRACES)}")
    info = TRACES[name]
    path = resources.files("splitwise_bench").joinpath("data", "traces", info.file)
    with path.open("rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as text:
        parsed = parse_azure(text) if info.format == "azure" else parse_mooncake(text)
    return tuple(sorted(parsed, key=lambda r: r.arrival_s))  # stable: ties keep file order
