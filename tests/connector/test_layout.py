"""Layout adapters, checked against what vLLM's own CPU kernel writes."""

import pytest
import torch

vllm_ops = pytest.importorskip("vllm._custom_ops")

from splitwise_local.connector.layout import (  # noqa: E402
    CpuPackedLayout,
    KvFirstLayout,
    LatentLayout,
    probe_cpu_packing,
)

ISAS = ["vec", "amx", "vec16"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_gather_reads_what_the_kernel_wrote(isa, dtype):
    blocks, heads, block_size, head = 6, 3, 128, 64
    layout = CpuPackedLayout(heads, head, block_size, isa, dtype)
    cache = torch.zeros(blocks, heads, block_size, 2 * head, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, head).chunk(2, dim=2)
    generator = torch.Generator().manual_seed(0)
    slots = torch.randperm(blocks * block_size, generator=generator)[:300]
    key = torch.randn(300, heads, head, generator=generator).to(dtype)
    value = torch.randn(300, heads, head, generator=generator).to(dtype)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)

    rows = layout.gather(cache, slots)
    assert torch.equal(rows[0], key) and torch.equal(rows[1], value)

    rebuilt = torch.zeros_like(cache)
    layout.scatter(rebuilt, slots, rows)
    assert torch.equal(rebuilt, cache)


def test_scatter_of_a_partial_block_keeps_the_other_tokens():
    layout = CpuPackedLayout(2, 64, 128, "vec", torch.bfloat16)
    cache = torch.randn(3, 2, 128, 128).bfloat16()
    before = cache.clone()
    slots = torch.arange(130, 140)
    new_rows = torch.randn(2, 10, 2, 64).bfloat16()
    layout.scatter(cache, slots, new_rows)
    assert torch.equal(layout.gather(cache, slots), new_rows)
    others = torch.tensor([s for s in range(3 * 128) if not 130 <= s < 140])
    assert torch.equal(layout.gather(cache, others), layout.gather(before, others))


def test_the_packing_is_not_token_major():
    # Guards the reason this module exists: indexing dim 2 as "token" would be wrong.
    offsets = probe_cpu_packing("vec", 128, 64, torch.bfloat16)
    assert offsets[0, 1, 0] != 1 * 128  # token 1, channel 0 is not one row down
    assert offsets.flatten().sort().values.equal(torch.arange(2 * 128 * 64))


def test_latent_layout_round_trip():
    layout = LatentLayout(head_size=576, block_size=128)
    cache = torch.zeros(4, 1, 128, 576, dtype=torch.bfloat16)
    slots = torch.tensor([5, 200, 300, 511])
    rows = torch.randn(1, 4, 1, 576).bfloat16()
    layout.scatter(cache, slots, rows)
    assert torch.equal(cache.view(-1, 576)[200], rows[0, 1, 0])
    assert torch.equal(layout.gather(cache, slots), rows)


def test_kv_first_layout_round_trip():
    layout = KvFirstLayout(heads=2, head_size=8, block_size=16)
    cache = torch.zeros(2, 5, 16, 2, 8)
    slots = torch.tensor([3, 17, 79])
    rows = torch.randn(2, 3, 2, 8)
    layout.scatter(cache, slots, rows)
    assert torch.equal(cache[1, 1, 1], rows[1, 1])
    assert torch.equal(layout.gather(cache, slots), rows)
