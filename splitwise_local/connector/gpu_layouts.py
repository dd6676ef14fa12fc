"""vLLM 0.32's KV cache allocations as data, for machines that have a GPU but no vLLM.

`vllm_caches` builds a model's per-layer caches with vLLM's own functions, as its model
runners do (`get_kv_cache_config_from_groups`, then `allocate_kv_cache` under a
`KVCacheLayout`), on any device: the CPU here, `meta` for shapes too big to allocate. `python -m
splitwise_local.connector.gpu_layouts` writes, for every case of `CASES`, the shape, strides and
offset of each layer's tensor and where vLLM's own views (FlashAttention's K/V split, MLA's
latent) put a sample of (layer, slot, head, K/V, channel) positions in the buffer, into
`splitwise_local/data/gpu_layouts.json`. `rebuild` makes the same tensors from that file, with
torch alone, on a GPU (`scripts/gpu_check.sh`); the tests check the file against vLLM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

DATA = Path(__file__).resolve().parent.parent / "data" / "gpu_layouts.json"
PROBES_PER_CASE = 48


@dataclass(frozen=True)
class Case:
    """One model's KV cache under one layout: `heads` of `head_size` (MLA: one latent)."""

    layout: str
    layers: int
    heads: int
    head_size: int
    block_size: int
    num_blocks: int
    dtype: str = "bfloat16"
    mla: bool = False
    kernel_block_size: int | None = None
    probes: bool = True

    @property
    def key(self) -> str:
        kind = "mla" if self.mla else f"{self.heads}x{self.head_size}"
        split = f"/{self.kernel_block_size}" if self.kernel_block_size else ""
        return f"{self.layout}-{self.layers}L-{kind}-b{self.block_size}{split}"


LAYOUT_NAMES = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
CASES = [
    *(Case(name, 3, 2, 8, block, 6) for name in LAYOUT_NAMES for block in (16, 32, 64)),
    *(Case(name, 3, 1, 40, 64, 4, mla=True) for name in LAYOUT_NAMES),
    *(Case(name, 3, 2, 8, 64, 4, kernel_block_size=16) for name in ("LBHNC", "LBNHC")),
    # A 7B-shaped model (32 layers, 8 KV heads of 128): shapes and strides only, no probes.
    *(Case(name, 32, 8, 128, 16, 192, probes=False) for name in LAYOUT_NAMES),
]


def vllm_caches(case: Case, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """The per-layer caches vLLM 0.32's model runner allocates for `case`, in layer order."""
    # vLLM only where the data is made from it: `rebuild` and the check run without vLLM.
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec, MLAAttentionSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
    from vllm.v1.worker.utils import allocate_kv_cache

    config = VllmConfig()
    config.cache_config.kv_cache_layout = case.layout
    config.cache_config.num_gpu_blocks_override = case.num_blocks
    spec_class = MLAAttentionSpec if case.mla else FullAttentionSpec
    spec = spec_class(
        block_size=case.block_size,
        num_kv_heads=case.heads,
        head_size=case.head_size,
        dtype=getattr(torch, case.dtype),
    )
    names = [f"model.layers.{i}.self_attn.attn" for i in range(case.layers)]
    kv_config = get_kv_cache_config_from_groups(
        config, [KVCacheGroupSpec(names, spec)], spec.page_size_bytes * case.layers
    )
    kernel = [case.kernel_block_size] if case.kernel_block_size else None
    caches = allocate_kv_cache(kv_config, torch.device(device), KVCacheLayout[case.layout], kernel)
    return [caches[name] for name in names]


def vllm_views(cache: torch.Tensor, case: Case) -> tuple[torch.Tensor, ...]:
    """What vLLM's attention reads of one layer's cache: FlashAttention's K and V, each
    `[blocks, block_size, heads, head_size]`, or the MLA backends' `[blocks, block_size, C]`."""
    if case.mla:
        return (cache.squeeze(1),)
    return torch.split(cache.transpose(1, 2), case.head_size, dim=-1)


def whole_buffer(cache: torch.Tensor) -> torch.Tensor:
    """The flat buffer all layers are views of, in the caches' dtype."""
    storage = cache.untyped_storage()
    flat = torch.empty(0, dtype=cache.dtype, device=cache.device)
    return flat.set_(storage, 0, (storage.nbytes() // cache.element_size(),), (1,))


def probe(case: Case, caches: list[torch.Tensor], count: int, seed: int = 0) -> list[list[int]]:
    """`[layer, slot, head, kv, channel, offset]`: where writing one element through vLLM's
    views lands in the buffer, for `count` distinct positions drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    views = [vllm_views(cache, case) for cache in caches]
    blocks, size = caches[0].shape[0], caches[0].shape[2]
    found: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    buffer = whole_buffer(caches[0])
    while len(found) < count:
        layer, block, position, head, kv, channel = drawn = tuple(
            int(torch.randint(high, (1,), generator=generator))
            for high in (case.layers, blocks, size, caches[0].shape[1], len(views[0]),
                         views[0][0].shape[-1])
        )  # fmt: skip
        if drawn in seen:
            continue
        seen.add(drawn)
        buffer.zero_()
        view = views[layer][kv]
        index = (block, position, channel) if case.mla else (block, position, head, channel)
        view[index] = 1
        (offset,) = torch.nonzero(buffer).flatten().tolist()
        found.append([layer, block * size + position, head, kv, channel, offset])
    buffer.zero_()
    return found


def describe(case: Case) -> dict[str, Any]:
    """`case`'s allocation as vLLM makes it: each layer's shape, strides and storage offset (in
    elements), the buffer's size in bytes, and `probe`'s sample positions."""
    caches = vllm_caches(case, "cpu" if case.probes else "meta")
    first = caches[0]
    return {
        "case": asdict(case),
        "bytes": first.untyped_storage().nbytes(),
        "layers": [[list(t.shape), list(t.stride()), t.storage_offset()] for t in caches],
        "probes": probe(case, caches, PROBES_PER_CASE) if case.probes else [],
    }


def write(path: Path = DATA) -> None:
    # vLLM only where the data is made from it, as in `vllm_caches`.
    import vllm
    from vllm.v1.kv_cache_layout import KVCacheLayout

    data = {
        "vllm": vllm.__version__,
        "layouts": {member.name: list(member.value) for member in KVCacheLayout},
        "cases": [describe(case) for case in CASES],
    }
    path.write_text(json.dumps(data, separators=(",", ":")) + "\n")


def load(path: Path = DATA) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class CarriedLayout(NamedTuple):
    """A member of vLLM's `KVCacheLayout` as carried: its name and stride order (its value)."""

    name: str
    value: tuple[int, ...]


def layouts(data: dict[str, Any]) -> dict[str, CarriedLayout]:
    """vLLM's `KVCacheLayout` members by name, as `layout_for` reads them."""
    return {name: CarriedLayout(name, tuple(order)) for name, order in data["layouts"].items()}


def rebuild(entry: dict[str, Any], device: str | torch.device) -> list[torch.Tensor]:
    """The per-layer caches `entry` describes, zeroed, on `device`: the same shapes, strides and
    offsets over one buffer that vLLM would allocate."""
    case = Case(**entry["case"])
    dtype = getattr(torch, case.dtype)
    buffer = torch.zeros(entry["bytes"], dtype=torch.int8, device=device).view(dtype)
    return [buffer.as_strided(shape, stride, offset) for shape, stride, offset in entry["layers"]]


if __name__ == "__main__":
    write()
    print(f"wrote {DATA}")
