"""One adapter per KV cache layout, between vLLM's paged cache and token-major chunk rows.

Every adapter moves the KV of a list of cache *slots* (slot = block_id * block_size + offset)
of **all layers at once** to and from a token-major tensor `[layers, kv, tokens, heads,
head_size]` (kv = 2 for K and V, 1 for MLA's single latent): the chunk format the serdes and
the store see. So `chunk_size` need not match the engine's block size, stored KV does not depend
on the CPU's instruction set, and the serdes see real token and channel axes.

All layers at once because vLLM 0.32 allocates every layer's cache as a view of one buffer
(`allocate_kv_cache`, on every device): `LayerCaches` sees them as one `[layers, ...]` tensor,
so one copy moves a block of every layer, and the per-call overhead is paid per block instead
of per block and layer.

Two adapters. `PagedLayout` reads vLLM's logical per-layer view `[blocks, heads, block_size,
K|V]` (or MLA's latent) under whichever `KVCacheLayout` the engine resolved: GPU attention and
MLA everywhere. `CpuPackedLayout` reads the CPU attention backend's packed blocks. `layout_for`
picks one from the device and the resolved layout; `cpu_packing` says how the CPU kernel packs
a block.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from splitwise_local.connector.cpu_packing import HalfPacking, probe_cpu_packing
from splitwise_local.connector.device import to_device

ELEMENTWISE_BELOW = 4  # fewer tokens of a block than this move element by element
Halves = tuple[HalfPacking, HalfPacking]  # K's packing, V's


class StrideOrder(Protocol):
    """What `layout_for` reads of vLLM's `KVCacheLayout` (a member's name and its value, the
    stride order of `[L, B, H, N, C]`), so a machine without vLLM can pass the layouts as
    carried (`gpu_layouts.layouts`)."""

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> tuple[int, ...]: ...


class LayerCaches:
    """One worker's per-layer cache tensors, in layer order, and one view over all of them.

    `stacked` is a `[layers, *layer_shape]` view of the same memory when the layers are equally
    spaced views of one storage (vLLM's CPU backend allocates them so), else None and the
    adapters go layer by layer.
    """

    def __init__(self, layers: Sequence[torch.Tensor]) -> None:
        self.layers = list(layers)
        self.stacked = _stack_views(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.layers[0].device

    def groups(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """(layer range, `[n, *layer_shape]` tensor) pieces that together cover every layer."""
        if self.stacked is not None:
            yield slice(0, len(self.layers)), self.stacked
            return
        for index, layer in enumerate(self.layers):
            yield slice(index, index + 1), layer.unsqueeze(0)


def _stack_views(layers: list[torch.Tensor]) -> torch.Tensor | None:
    first = layers[0]
    same = all(
        t.shape == first.shape and t.stride() == first.stride() and t.dtype == first.dtype
        and t.device == first.device
        and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        for t in layers
    )  # fmt: skip
    if not same:
        return None
    offsets = [t.storage_offset() for t in layers]
    step = offsets[1] - offsets[0] if len(layers) > 1 else 0
    uneven = any(b - a != step for a, b in itertools.pairwise(offsets))
    if uneven or (len(layers) > 1 and step <= 0):
        return None
    return first.as_strided((len(layers), *first.shape), (step, *first.stride()), offsets[0])


class KVLayout(ABC):
    """Moves KV rows of every layer between the paged caches and token-major tensors."""

    name: str
    kv: int
    heads: int
    head_size: int
    block_size: int

    def gather(self, caches: LayerCaches, slots: torch.Tensor) -> torch.Tensor:
        """`[layers, kv, len(slots), heads, head_size]`, a new tensor."""
        out = None
        for layers, cache in caches.groups():
            rows = self._gather(cache, slots)
            if out is None:
                out = rows.new_empty((len(caches), *rows.shape[1:]))
            out[layers] = rows
        assert out is not None
        return out

    def scatter(self, caches: LayerCaches, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Writes `rows` (as `gather` returns them) into every layer's cache at `slots`."""
        rows = to_device(rows, caches.device)
        for layers, cache in caches.groups():
            self._scatter(cache, slots, rows[layers])

    @abstractmethod
    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """`cache` is `[n, *layer_shape]`; returns `[n, kv, tokens, heads, head_size]`."""

    @abstractmethod
    def _scatter(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """The inverse of `_gather`, writing nothing but the given slots."""


def slots_for(block_ids: Sequence[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of tokens [start, end) of a request whose blocks are `block_ids`."""
    tokens = torch.arange(start, end)
    blocks = torch.as_tensor(block_ids, dtype=torch.long)[tokens // block_size]
    return blocks * block_size + tokens % block_size


def _split_slots(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.div(slots, block_size, rounding_mode="floor"), slots % block_size


def whole_blocks(
    slots: torch.Tensor, block_size: int
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Runs of `slots` that fill a block in order: [(row index, block id)], and the rest.

    The rest is a bool mask over `slots` of the tokens that are not in such a run.
    """
    count = len(slots)
    rest = torch.ones(count, dtype=torch.bool)
    if count < block_size:
        return [], rest
    step_ok = torch.cat([torch.zeros(1, dtype=torch.long), (slots[1:] - slots[:-1] == 1).long()])
    ok_before = torch.cumsum(step_ok, 0)  # ok_before[i] = in-order steps up to row i
    starts = torch.nonzero(slots[: count - block_size + 1] % block_size == 0).flatten()
    ends = starts + block_size - 1
    full = ok_before[ends] - ok_before[starts] == block_size - 1
    runs = []
    for start in starts[full].tolist():
        runs.append((start, int(slots[start]) // block_size))
        rest[start : start + block_size] = False
    return runs, rest


@dataclass
class CpuPackedLayout(KVLayout):
    """vLLM's CPU attention cache: `[blocks, heads, block_size, 2 * head_size]`, ISA-packed."""

    heads: int
    head_size: int
    block_size: int
    isa: str
    dtype: torch.dtype = torch.bfloat16
    kv: int = 2

    def __post_init__(self) -> None:
        self.name = "cpu-packed"
        self.offsets = probe_cpu_packing(self.isa, self.block_size, self.head_size, self.dtype)
        half = self.block_size * self.head_size
        key, value = (HalfPacking.from_offsets(self.offsets[kv] - kv * half, self.heads)
                      for kv in range(2))  # fmt: skip
        # None when a half's packing is no bit permutation: every token then goes by element.
        self.halves = (key, value) if key is not None and value is not None else None

    def _regions(self, cache: torch.Tensor) -> torch.Tensor:
        """`[n, blocks, heads, 2, block_size * D]`: each (block, head)'s K and V halves."""
        return cache.view(cache.shape[0], cache.shape[1], self.heads, 2, -1)

    @staticmethod
    def _unpack(halves: Halves, regions: torch.Tensor, block: int, out: torch.Tensor) -> None:
        """Block `block` of every layer into `out` `[n, 2, block_size, heads, D]` (a view)."""
        for kv, half in enumerate(halves):
            half.unpack(regions[:, block, :, kv], out[:, kv])

    @staticmethod
    def _pack(halves: Halves, rows: torch.Tensor, regions: torch.Tensor, block: int) -> None:
        for kv, half in enumerate(halves):
            half.pack(rows[:, kv], regions[:, block, :, kv])

    def _partial_blocks(
        self, slots: torch.Tensor, rest: torch.Tensor
    ) -> tuple[list[tuple[int, torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Tokens of `rest` grouped by block: (block, row indices, positions), and the tokens
        too few in their block to be worth moving the whole block (they go by element)."""
        rows = torch.nonzero(rest).flatten()
        blocks, positions = _split_slots(slots[rows], self.block_size)
        grouped: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        single = torch.zeros(len(slots), dtype=torch.bool)
        for block in torch.unique(blocks).tolist():
            mine = blocks == block
            if int(mine.sum()) < ELEMENTWISE_BELOW:
                single[rows[mine]] = True
            else:
                grouped.append((block, rows[mine], positions[mine]))
        return grouped, single

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        n, size = cache.shape[0], self.block_size
        out = cache.new_empty((n, 2, len(slots), self.heads, self.head_size))
        halves = self.halves
        if halves is None:
            self._gather_elements(cache, slots, torch.ones(len(slots), dtype=torch.bool), out)
            return out
        regions = self._regions(cache)
        runs, rest = whole_blocks(slots, size)
        for start, block in runs:
            self._unpack(halves, regions, block, out[:, :, start : start + size])
        grouped, single = self._partial_blocks(slots, rest)
        if grouped:
            whole = cache.new_empty((n, 2, size, self.heads, self.head_size))
            for block, rows, positions in grouped:
                self._unpack(halves, regions, block, whole)
                out[:, :, rows] = whole[:, :, positions]
        self._gather_elements(cache, slots, single, out)
        return out

    def _scatter(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Whole blocks are packed in one copy; a partly covered block is read, updated and
        written back whole, so a concurrent writer of its other tokens would be undone: the
        connector only writes blocks nothing else writes at that moment."""
        n, size = cache.shape[0], self.block_size
        rows = rows.to(cache.dtype)
        halves = self.halves
        if halves is None:
            self._scatter_elements(cache, slots, torch.ones(len(slots), dtype=torch.bool), rows)
            return
        regions = self._regions(cache)
        runs, rest = whole_blocks(slots, size)
        for start, block in runs:
            self._pack(halves, rows[:, :, start : start + size], regions, block)
        grouped, single = self._partial_blocks(slots, rest)
        if grouped:
            whole = cache.new_empty((n, 2, size, self.heads, self.head_size))
            for block, indices, positions in grouped:
                self._unpack(halves, regions, block, whole)
                whole[:, :, positions] = rows[:, :, indices]
                self._pack(halves, whole, regions, block)
        self._scatter_elements(cache, slots, single, rows)

    def _element_index(
        self, cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        blocks, positions = _split_slots(slots, self.block_size)
        flat = cache.view(cache.shape[0], cache.shape[1], self.heads, -1)
        return flat, blocks.view(1, -1, 1), self.offsets[:, positions, :]  # offsets [2, T, D]

    def _gather_elements(
        self, cache: torch.Tensor, slots: torch.Tensor, which: torch.Tensor, out: torch.Tensor
    ) -> None:
        if which.any():
            flat, blocks, offsets = self._element_index(cache, slots[which])
            out[:, :, which] = flat[:, blocks, :, offsets].permute(3, 0, 1, 4, 2)

    def _scatter_elements(
        self, cache: torch.Tensor, slots: torch.Tensor, which: torch.Tensor, rows: torch.Tensor
    ) -> None:
        if which.any():
            flat, blocks, offsets = self._element_index(cache, slots[which])
            flat[:, blocks, :, offsets] = rows[:, :, which].permute(1, 2, 4, 0, 3)


@dataclass
class PagedLayout(KVLayout):
    """vLLM 0.32's cache as its model runners allocate it (`allocate_kv_cache`), on a GPU.

    Each layer gets a `[blocks, heads, block_size, C]` view of one buffer. C holds K then V,
    `head_size` channels each (FlashAttention and FlashInfer split it so:
    `kv_cache.transpose(1, 2).split(head_size, dim=-1)`), or MLA's one latent per token (its
    backends read `kv_cache.squeeze(1)`, heads = 1). The engine's `KVCacheLayout` only orders
    these axes in memory, so the adapter indexes the logical view and the strides come with
    the tensors; `layout_for` checks them against the layout the engine resolved.

    vLLM cuts the layer views out of one `[layers, blocks, heads, block_size, C]` view, so
    `LayerCaches` stacks them back and one indexing op moves the tokens of every layer: in the
    block-major layouts (BL*, BHLNC) it reads or writes a block of every layer as one
    contiguous region. A cache split into kernel blocks smaller than `block_size` is indexed
    in its own block size: vLLM splits only dense pages, so kernel block j of block b is
    `b * ratio + j` and a slot's kernel block is `slot // kernel_block_size`.
    """

    heads: int
    head_size: int
    block_size: int
    kv_cache_layout: str
    kv: int = 2

    def __post_init__(self) -> None:
        self.name = f"{'mla' if self.kv == 1 else 'per-head'}-{self.kv_cache_layout}"

    def _index(
        self, cache: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`cache` as `[n, heads, blocks, block_size, C]`, and each slot's block and position:
        indexing the two adjacent axes keeps the layers and heads in front, in place."""
        blocks, positions = _split_slots(slots.to(cache.device), cache.shape[3])
        return cache.transpose(1, 2), blocks, positions

    def _gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        heads_first, blocks, positions = self._index(cache, slots)
        picked = heads_first[:, :, blocks, positions]  # [n, heads, tokens, C]
        rows = picked.view(*picked.shape[:-1], self.kv, self.head_size).permute(0, 3, 2, 1, 4)
        return rows.contiguous()

    def _scatter(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        heads_first, blocks, positions = self._index(cache, slots)
        values = rows.to(cache.dtype).permute(0, 3, 2, 1, 4).flatten(-2)  # [n, heads, tokens, C]
        heads_first[:, :, blocks, positions] = values


def _check_strides(cache: torch.Tensor, name: str, order: tuple[int, ...]) -> None:
    """Refuses a cache whose memory order is not that of `name`'s stride order.

    vLLM's `KVCacheLayout` values are stride orders of `[L, B, H, N, C]`; one layer's view
    `[B, H, N, C]` keeps the order of the last four (vLLM's `layer_view_order`). Axes of size
    one have no order.
    """
    view_order = [axis - 1 for axis in order if axis != 0]
    strides = [cache.stride(axis) for axis in view_order if cache.shape[axis] > 1]
    if cache.dim() != 4 or cache.stride(3) != 1 or strides != sorted(set(strides), reverse=True):
        raise ValueError(
            f"a KV cache of shape {tuple(cache.shape)} and strides {cache.stride()} is not "
            f"laid out as {name}"
        )


def layout_for(
    cache: torch.Tensor,
    *,
    kv_cache_layout: StrideOrder,
    use_mla: bool,
    heads: int,
    head_size: int,
    block_size: int,
) -> KVLayout:
    """The adapter for an engine's caches, from one layer's cache tensor (its device), the
    `KVCacheLayout` the engine resolved (`cache_config.get_resolved_kv_cache_layout()`, as
    vLLM's model runners read it: only its `name` and its stride order, `value`, are used) and
    the model's facts."""
    name, order = kv_cache_layout.name, tuple(kv_cache_layout.value)
    _check_strides(cache, name, order)
    if block_size % cache.shape[2]:
        raise ValueError(f"{cache.shape[2]}-token cache blocks do not divide {block_size}")
    if cache.device.type == "cpu" and not use_mla:
        if name != "LBHNC" or cache.shape[2] != block_size:
            raise NotImplementedError(f"vLLM's CPU attention packs LBHNC blocks, not {name}")
        # Imported here for the same reason as the kernel in `probe_cpu_packing`.
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(cache.dtype, block_size, head_size)
        return CpuPackedLayout(heads, head_size, block_size, isa, cache.dtype)
    kv = 1 if use_mla else 2
    width = kv * head_size if not use_mla else cache.shape[-1]
    if cache.shape[-1] != width or (not use_mla and cache.shape[1] != heads):
        raise NotImplementedError(
            f"no KV layout adapter for a cache of shape {tuple(cache.shape)} "
            f"({heads} heads of {head_size}, mla={use_mla})"
        )
    return PagedLayout(cache.shape[1], width // kv, block_size, name, kv)
