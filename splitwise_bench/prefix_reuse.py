"""Ideal prefix reuse: the share of prompt blocks whose whole prefix (this block and all before
it) was in an earlier prompt, which no prefix cache can beat; over the whole Mooncake hour it is
36.6%. With a capacity it is the same under an LRU of that many tokens, which a store's hit
ratio at that capacity can be judged against.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from splitwise_bench.trace_files import TraceError, TraceRequest

# What a SmolLM2-135M token's KV takes in bf16 (30 layers x K and V x 3 heads x 64 x 2 bytes):
# turns a store capacity in bytes into tokens when no other figure is given.
DEFAULT_KV_BYTES_PER_TOKEN = 23_040


@dataclass
class Reuse:
    """Prompt blocks and tokens a prefix cache could have served from earlier prompts."""

    blocks: int = 0
    reused_blocks: int = 0
    tokens: int = 0
    reused_tokens: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "reused_blocks": self.reused_blocks,
            "block_ratio": self.reused_blocks / self.blocks if self.blocks else None,
            "tokens": self.tokens,
            "reused_tokens": self.reused_tokens,
            "token_ratio": self.reused_tokens / self.tokens if self.tokens else None,
        }


def prefix_reuse(
    prompts: Iterable[Sequence[tuple[int, int]]], capacity_tokens: int | None = None
) -> Reuse:
    """Reuse of prompts given as (block id, tokens) lists, in arrival order.

    A block is reused when the same prefix of ids up to it is held: from all earlier prompts
    (without a capacity: the ideal), or from what an LRU of `capacity_tokens` kept. Blocks count
    by id, as the trace defines them; tokens count what is held of a block (a partial block
    serves only the tokens an earlier prompt had). Each prompt stores its blocks with its first
    block the most recent (vLLM frees a request's blocks tail first), so a prefix outlives every
    block that extends it and what is held of a prompt is always a leading run, as a prefix
    cache needs; a partial block is held whole once any prompt went on past it."""
    nodes: dict[tuple[int, int], int] = {}  # (parent node, block id) -> node; root is 0
    held: OrderedDict[int, int] = OrderedDict()  # node -> tokens held, least recent first
    used = 0
    reuse = Reuse()
    for blocks in prompts:
        parent = 0
        path = []
        for block_id, tokens in blocks:
            node = nodes.setdefault((parent, block_id), len(nodes) + 1)
            reuse.blocks += 1
            reuse.tokens += tokens
            if (stored := held.get(node)) is not None:
                reuse.reused_blocks += 1
                reuse.reused_tokens += min(tokens, stored)
            path.append((node, tokens))
            parent = node
        for node, tokens in reversed(path):
            old = held.pop(node, 0)
            held[node] = max(old, tokens)
            used += held[node] - old
        while capacity_tokens is not None and used > capacity_tokens:
            used -= held.popitem(last=False)[1]
    return reuse


def capacity_tokens(
    blocks: int | None = None,
    bytes_: int | None = None,
    block_tokens: int | None = None,
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN,
) -> int:
    """A store's capacity in tokens, from a number of replayed blocks or of KV bytes."""
    if blocks is not None:
        if block_tokens is None:
            raise TraceError("a capacity in blocks needs a trace with blocks (Mooncake)")
        return blocks * block_tokens
    if bytes_ is None:
        raise TraceError("a capacity needs blocks or bytes")
    return bytes_ // kv_bytes_per_token


def reuse_summary(
    chosen: Sequence[TraceRequest],
    sent: Sequence[Sequence[tuple[int, int]]],
    block_tokens: int,
    capacities: Sequence[dict[str, int]],
    kv_bytes_per_token: int,
) -> dict[str, Any]:
    """The ideal reuse of the trace's own blocks and of the blocks `sent`, and under an LRU of
    each capacity ({"blocks": N} replayed blocks or {"bytes": B} of KV)."""
    lru = []
    for capacity in capacities:
        tokens = capacity_tokens(
            capacity.get("blocks"), capacity.get("bytes"), block_tokens, kv_bytes_per_token
        )
        named = {f"capacity_{unit}": value for unit, value in capacity.items()}
        lru.append({**named, "capacity_tokens": tokens, **prefix_reuse(sent, tokens).as_dict()})
    return {
        "trace_blocks": prefix_reuse(r.blocks() for r in chosen).as_dict(),
        "replay": prefix_reuse(sent).as_dict(),
        "lru": lru,
        "kv_bytes_per_token": kv_bytes_per_token,
    }
