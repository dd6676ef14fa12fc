"""The GPU layout adapter against vLLM 0.32's own allocation, on the CPU.

The caches come from vLLM's `allocate_kv_cache` under each `KVCacheLayout`; known KV goes in and
comes out through the views vLLM's attention uses (FlashAttention's K/V split, FlashInfer's
NHD/HND view, MLA's latent), never through the adapter's own indexing.
"""

from dataclasses import asdict

import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
from vllm.v1.attention.backends.utils import get_flashinfer_layout_string
from vllm.v1.kv_cache_layout import KVCacheLayout

from splitwise_local.connector import gpu_layouts
from splitwise_local.connector.gpu_layouts import Case, vllm_caches, vllm_views
from splitwise_local.connector.layout import (
    CpuPackedLayout,
    LayerCaches,
    PagedLayout,
    layout_for,
    slots_for,
)

LAYOUTS = [member.name for member in KVCacheLayout]
TABLE = [4, 1, 5, 0]  # a request's blocks, out of order


def write_through_vllm(caches, case: Case, slots: torch.Tensor, values: torch.Tensor) -> None:
    """`values` `[layers, kv, tokens, heads, head_size]` into vLLM's views at `slots`."""
    size = caches[0].shape[2]
    blocks, positions = slots // size, slots % size
    for layer, cache in enumerate(caches):
        for kv, view in enumerate(vllm_views(cache, case)):
            part = values[layer, kv]
            view[blocks, positions] = part[:, 0] if case.mla else part


def read_through_vllm(caches, case: Case, slots: torch.Tensor) -> torch.Tensor:
    size = caches[0].shape[2]
    blocks, positions = slots // size, slots % size
    layers = []
    for cache in caches:
        views = vllm_views(cache, case)
        parts = [view[blocks, positions] for view in views]
        layers.append(torch.stack([p.unsqueeze(1) if case.mla else p for p in parts]))
    return torch.stack(layers)


def kv_values(case: Case, tokens: int, seed: int) -> torch.Tensor:
    """Distinct nonzero values, `[layers, kv, tokens, heads, head_size]`."""
    kv, heads, width = (1, 1, case.head_size) if case.mla else (2, case.heads, case.head_size)
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(case.layers, kv, tokens, heads, width, generator=generator) + 1
    return values.to(getattr(torch, case.dtype))


def adapter(case: Case) -> PagedLayout:
    kv, heads = (1, 1) if case.mla else (2, case.heads)
    return PagedLayout(heads, case.head_size, case.block_size, case.layout, kv)


def check_case(case: Case, start: int, end: int) -> None:
    """Tokens [start, end) of a request whose blocks are `TABLE`: written through vLLM's views,
    gathered by the adapter; scattered by the adapter, read through vLLM's views, and nothing
    else in the buffer touched."""
    slots = slots_for(TABLE, start, end, case.block_size)
    values = kv_values(case, end - start, seed=start)
    layout = adapter(case)

    caches = vllm_caches(case)
    stacked = LayerCaches(caches)
    assert stacked.stacked is not None, "one op moves every layer"
    write_through_vllm(caches, case, slots, values)
    assert torch.equal(layout.gather(stacked, slots), values)

    fresh = vllm_caches(case)
    layout.scatter(LayerCaches(fresh), slots, values)
    assert torch.equal(read_through_vllm(fresh, case, slots), values)
    buffer = gpu_layouts.whole_buffer(fresh[0])
    assert int(torch.count_nonzero(buffer)) == values.numel()

    copies = [c.clone() for c in caches]  # separate tensors: the adapter goes layer by layer
    assert LayerCaches(copies).stacked is None
    assert torch.equal(layout.gather(LayerCaches(copies), slots), values)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("name", LAYOUTS)
def test_per_head_caches_round_trip_through_vllms_views(name, block):
    case = Case(name, layers=3, heads=2, head_size=8, block_size=block, num_blocks=6)
    check_case(case, 0, 4 * block)  # whole blocks
    check_case(case, block // 2 + 3, 3 * block + 5)  # a chunk not aligned to blocks


@pytest.mark.parametrize("name", LAYOUTS)
def test_mla_latents_round_trip_through_vllms_views(name):
    case = Case(name, layers=3, heads=1, head_size=40, block_size=64, num_blocks=6, mla=True)
    check_case(case, 5, 200)


@pytest.mark.parametrize("name", ["LBHNC", "LBNHC"])
def test_blocks_split_into_kernel_blocks(name):
    """vLLM may view 64-token blocks as 16-token kernel blocks; slots stay the scheduler's."""
    case = Case(name, 3, 2, 8, block_size=64, num_blocks=6, kernel_block_size=16)
    assert vllm_caches(case)[0].shape[2] == 16
    check_case(case, 7, 230)


@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "LHBNC"])
def test_what_the_adapter_writes_is_what_flashinfer_reads(name):
    """FlashInfer reads a layer as `permute(layer_view_order)`, K first in the last axis, each
    block NHD or HND as vLLM names it."""
    case = Case(name, 3, 2, 8, 16, 6)
    slots = slots_for(TABLE, 3, 50, 16)
    values = kv_values(case, len(slots), seed=1)
    caches = vllm_caches(case)
    adapter(case).scatter(LayerCaches(caches), slots, values)
    layout = KVCacheLayout[name]
    blocks, positions = slots // 16, slots % 16
    for layer, cache in enumerate(caches):
        key, value = cache.permute(*layout.layer_view_order).split(8, dim=-1)
        for kv, view in enumerate((key, value)):
            if get_flashinfer_layout_string(layout) == "NHD":
                read = view[blocks, positions]
            else:
                read = view[blocks, :, positions]
            assert torch.equal(read, values[layer, kv])


@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_for_picks_the_paged_adapter_off_the_cpu(name, mla):
    """A device other than the CPU (`meta` stands in for CUDA): the engine's resolved layout."""
    case = Case(name, 3, 1 if mla else 2, 40 if mla else 8, 16, 6, mla=mla)
    cache = vllm_caches(case, "meta")[0]
    layout = layout_for(cache, kv_cache_layout=KVCacheLayout[name], use_mla=mla,
                        heads=case.heads, head_size=case.head_size, block_size=16)  # fmt: skip
    assert isinstance(layout, PagedLayout)
    assert (layout.kv_cache_layout, layout.kv, layout.heads) == (name, 1 if mla else 2, case.heads)
    assert layout.head_size == case.head_size


def test_layout_for_refuses_what_the_cache_contradicts():
    cache = vllm_caches(Case("LBHNC", 3, 2, 8, 16, 6), "meta")[0]
    for claimed in ("LBNHC", "BLNHC"):  # token-major blocks: not how this cache is laid out
        with pytest.raises(ValueError, match=f"not laid out as {claimed}"):
            layout_for(cache, kv_cache_layout=KVCacheLayout[claimed], use_mla=False, heads=2,
                       head_size=8, block_size=16)  # fmt: skip
    with pytest.raises(ValueError, match="do not divide 24"):
        layout_for(cache, kv_cache_layout=KVCacheLayout.LBHNC, use_mla=False, heads=2,
                   head_size=8, block_size=24)  # fmt: skip
    with pytest.raises(NotImplementedError):  # 3 heads of 8 is not this cache
        layout_for(cache, kv_cache_layout=KVCacheLayout.LBHNC, use_mla=False, heads=3,
                   head_size=8, block_size=16)  # fmt: skip


def test_layout_for_on_the_cpu():
    """CPU attention: the packed adapter with the ISA the engine picks; MLA: the paged one."""
    cache = vllm_caches(Case("LBHNC", 3, 2, 64, 128, 2))[0]
    layout = layout_for(cache, kv_cache_layout=KVCacheLayout.LBHNC, use_mla=False, heads=2,
                        head_size=64, block_size=128)  # fmt: skip
    assert isinstance(layout, CpuPackedLayout)
    assert layout.isa == _get_attn_isa(torch.bfloat16, 128, 64)
    latent = vllm_caches(Case("LBHNC", 3, 1, 40, 128, 2, mla=True))[0]
    mla = layout_for(latent, kv_cache_layout=KVCacheLayout.LBHNC, use_mla=True, heads=1,
                     head_size=40, block_size=128)  # fmt: skip
    assert isinstance(mla, PagedLayout) and mla.kv == 1
    blocked = vllm_caches(Case("BLHNC", 3, 2, 64, 128, 2))[0]
    with pytest.raises(NotImplementedError, match="CPU attention packs LBHNC"):
        layout_for(blocked, kv_cache_layout=KVCacheLayout.BLHNC, use_mla=False, heads=2,
                   head_size=64, block_size=128)  # fmt: skip


def test_the_carried_allocations_are_vllms():
    """`gpu_layouts.json` (what the GPU check builds its caches from, without vLLM) is what
    vLLM computes today; rebuilt from it, the caches put every probed position where vLLM's
    views put it."""
    data = gpu_layouts.load()
    assert data["layouts"] == {m.name: list(m.value) for m in KVCacheLayout}
    assert [entry["case"] for entry in data["cases"]] == [
        asdict(case) for case in gpu_layouts.CASES
    ]
    for entry in data["cases"]:
        case = Case(**entry["case"])
        assert gpu_layouts.describe(case) == entry, case.key
        if not case.probes:
            continue
        caches = gpu_layouts.rebuild(entry, "cpu")
        buffer = gpu_layouts.whole_buffer(caches[0])
        for layer, slot, head, kv, channel, offset in entry["probes"]:
            buffer.zero_()
            buffer[offset] = 1
            read = read_through_vllm(caches, case, torch.tensor([slot]))
            assert read[layer, kv, 0, head, channel] == 1 and read.sum() == 1


def test_the_carried_layouts_pick_the_paged_adapter_as_the_gpu_check_does():
    """Without vLLM the check hands `layout_for` the layouts as carried; off the CPU (`meta`
    here, CUDA there) every carried allocation gets the paged adapter with its layout."""
    data = gpu_layouts.load()
    carried = gpu_layouts.layouts(data)
    for entry in data["cases"]:
        case = Case(**entry["case"])
        cache = gpu_layouts.rebuild(entry, "meta")[0]
        layout = layout_for(cache, kv_cache_layout=carried[case.layout], use_mla=case.mla,
                            heads=case.heads, head_size=case.head_size,
                            block_size=case.block_size)  # fmt: skip
        assert isinstance(layout, PagedLayout) and layout.kv_cache_layout == case.layout
