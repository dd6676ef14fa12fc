"""Proof that decode really uses the stored KV, shares prefixes, and survives a dead store."""

from __future__ import annotations

import re

import pytest
import torch

from splitwise_local.config import SplitwiseConfig
from splitwise_local.connector.keys import chunk_keys, key_identity, per_head_layout
from splitwise_local.hardware.dtype import cpu_dtype
from splitwise_testing.system import start_system

pytestmark = pytest.mark.engine
DEAD_STORE_S = 90.0

SAVE_KEY = re.compile(r"splitwise save-key req=\S+ tokens=(\d+)-(\d+) key=(\w+)")


@pytest.fixture(scope="module")
def system(model_dir, tmp_path_factory):
    roles = {"prefill": "prefill", "decode": "decode"}
    root = tmp_path_factory.mktemp("proof")
    system = start_system(
        root, model_dir, SplitwiseConfig(chunk_size=256), roles, {"verify_loads": True}
    )
    yield system
    system.stop()


def tokens_of(reply: dict) -> list[int]:
    return reply["choices"][0]["token_ids"]


def saved_keys(engine) -> list[str]:
    """Keys the prefill engine stored for its last request (its summary line comes last)."""
    return [key for _, _, key in SAVE_KEY.findall(engine.wait_log(r"splitwise save req="))]


def test_the_proxy_derives_the_engines_identity_and_keys(system, model_dir, prose_tokens):
    """`key_identity` from plain facts gives the seed both engines log and the keys they store."""
    expected = key_identity(
        model_dir, dtype=cpu_dtype().dtype, layout=per_head_layout(3, 64), chunk_size=256
    )
    for engine in system.engines.values():
        logged = re.findall(r"splitwise key identity (.*)", engine.child.log_path.read_text())
        assert logged == [expected.describe()]  # once, at startup
    prefill = system.engines["prefill"]
    prompt = prose_tokens[6000:6300]
    prefill.new_log()
    prefill.complete(prompt, max_tokens=1)
    assert saved_keys(prefill) == chunk_keys(expected, prompt)


def test_store_serves_the_chunks_and_decode_counts_external_hits(system, prose_tokens, reference):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = prose_tokens[3000:4000]
    backend = system.backend()
    before = backend.stats()
    hits_before = decode.metric("vllm:external_prefix_cache_hits_total")
    prefill.new_log()
    prefill.complete(prompt, max_tokens=1)
    keys = saved_keys(prefill)
    assert len(keys) == 4  # 256 + 256 + 256 + 232 tokens
    assert backend.exists(keys) == 4
    answer = tokens_of(decode.complete(prompt))
    after = backend.stats()
    assert after["hits"] - before["hits"] >= 4
    assert decode.metric("vllm:external_prefix_cache_hits_total") - hits_before == 999
    assert answer == tokens_of(reference.complete(prompt))


def test_one_poisoned_middle_chunk_changes_the_output_and_restoring_it_restores_it(
    system, prose_tokens
):
    """Only tokens 256-512 of 600 are poisoned (with valid checksums, so the load takes them):
    the first and the last chunk, whose tail the decode engine keeps, stay exact, so a changed
    answer proves the bulk of the load is used, not just the last token's KV."""
    from splitwise_local.connector.codec import ChunkCodec
    from splitwise_local.serde import decode_any

    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = prose_tokens[4200:4800]
    prefill.new_log()
    prefill.complete(prompt, max_tokens=1)
    keys = saved_keys(prefill)
    assert len(keys) == 3
    clean = tokens_of(decode.complete(prompt))

    backend = system.backend()
    original = bytes(backend.get(keys[1]))
    kv, _ = decode_any(original)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(kv.shape, generator=generator).to(kv.dtype) * kv.float().std()
    backend.put(keys[1], ChunkCodec("naive").encode(noise))
    decode.new_log()
    poisoned = tokens_of(decode.complete(prompt))
    assert decode.expect_log(r"splitwise load req=\S+ tokens=599 .*verified=ok")
    assert poisoned != clean, "noise in the store did not change the output: KV was not used"

    backend.put(keys[1], original)
    assert tokens_of(decode.complete(prompt)) == clean


def test_prompts_with_a_common_prefix_share_its_chunks(system, prose_tokens, reference):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prefix = prose_tokens[:768]  # three whole 256-token chunks
    first = prefix + prose_tokens[1000:1100]
    second = prefix + prose_tokens[1200:1300]
    backend = system.backend()
    added = []
    for prompt in (first, second):
        items = backend.stats()["items"]
        prefill.complete(prompt, max_tokens=1)
        added.append(backend.stats()["items"] - items)
        assert tokens_of(decode.complete(prompt)) == tokens_of(reference.complete(prompt))
    # Four chunks for the first prompt; the second found its three prefix chunks stored.
    assert added == [4, 1]


def test_a_dead_store_costs_the_cache_not_the_request(system, prose_tokens, reference):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    prompt = prose_tokens[5000:5400]
    system.store_child.signal_group(9)
    system.store_child.reap()
    prefill.new_log()
    decode.new_log()
    prefill.complete(prompt, max_tokens=1)
    # A hang guard: a store client finds its store dead at its own deadlines (Mooncake's RPC
    # deadline is 10 s, and a save asks what is stored before it puts).
    assert prefill.expect_log(r"splitwise save req=\S+ stops at tokens 0-", timeout=DEAD_STORE_S)
    assert tokens_of(decode.complete(prompt)) == tokens_of(reference.complete(prompt))
    assert decode.expect_log("splitwise store unavailable", timeout=DEAD_STORE_S)
