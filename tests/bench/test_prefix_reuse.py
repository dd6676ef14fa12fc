"""Ideal prefix reuse: only prefixes already seen count, an LRU keeps what a prefix cache would,
and the whole Mooncake hour gives the published share."""

from __future__ import annotations

import pytest

from splitwise_bench.prefix_reuse import prefix_reuse
from splitwise_bench.trace_files import load_trace


def test_ideal_reuse_counts_only_prefixes_already_seen():
    prompts = [
        [(1, 4), (2, 4), (3, 2)],  # nothing seen yet
        [(1, 4), (2, 4), (3, 4)],  # all three blocks seen; only 2 tokens of the last one
        [(9, 4), (2, 4)],  # block 2 was seen, but never after block 9: not a prefix
        [(1, 4), (2, 4), (3, 4), (4, 4)],  # three blocks and 12 tokens seen
    ]
    ideal = prefix_reuse(prompts).as_dict()
    assert (ideal["blocks"], ideal["reused_blocks"]) == (12, 6)
    assert (ideal["tokens"], ideal["reused_tokens"]) == (46, 22)
    assert ideal["block_ratio"] == 0.5
    # an LRU of 12 tokens: prompt 3 evicts blocks 3 and 2 (least recent), keeping block 1,
    # which the prompt before it used first: prompt 4 finds only its first block
    lru = prefix_reuse(prompts, capacity_tokens=12).as_dict()
    assert (lru["reused_blocks"], lru["reused_tokens"]) == (4, 14)
    assert prefix_reuse(prompts, capacity_tokens=10**6) == prefix_reuse(prompts)
    assert prefix_reuse(prompts, capacity_tokens=1).reused_blocks == 0


def test_the_mooncake_hours_ideal_reuse_is_the_published_share():
    reuse = prefix_reuse(r.blocks() for r in load_trace("mooncake-conv"))
    assert reuse.as_dict()["block_ratio"] == pytest.approx(0.366, abs=5e-4)
