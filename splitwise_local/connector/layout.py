"""One adapter per KV cache layout, between vLLM's paged cache and token-major chunk rows.

Every adapter moves the KV of a list of cache *slots* (slot = block_id * block_size + offset)
to and from a token-major tensor of shape `[kv, tokens, heads, head_size]` (kv = 2 for K and V,
1 for MLA's single latent). The store, the keys and the serdes only ever see that token-major
form, so `chunk_size` need not match the engine's block size, stored KV does not depend on the
CPU's instruction set, and the serdes see real token and channel axes.

The CPU backend does not store a block token by token: `cpu_attn_reshape_and_cache` packs each
(block, head) as `[2 * block_size, head_size]` elements in an ISA-dependent order (`vec`, `amx`,
...). Rather than hard-coding those orders, `probe_cpu_packing` asks vLLM's own kernel where it
writes each (token, channel) and keeps that permutation; gather and scatter index through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import lru_cache

import torch

PROBE_BASE = 64  # digits below 64 are exact in every float dtype the cache may use


class KVLayout(ABC):
    """Moves KV rows between one layer's paged cache and token-major tensors."""

    name: str
    kv: int
    heads: int
    head_size: int
    block_size: int

    @abstractmethod
    def gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Returns `[kv, len(slots), heads, head_size]`, a new tensor."""

    @abstractmethod
    def scatter(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Writes `rows` (as returned by gather) into the cache at `slots`."""


def _split_slots(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.div(slots, block_size, rounding_mode="floor"), slots % block_size


@lru_cache(maxsize=16)
def probe_cpu_packing(isa: str, block_size: int, head_size: int, dtype: torch.dtype):
    """Where vLLM's CPU kernel puts K and V of (token, channel) inside one (block, head).

    Returns a long tensor `[2, block_size, head_size]` of offsets into the flattened
    `[2 * block_size * head_size]` region: [0] for K, [1] for V. Found by writing each digit of
    the token and channel indices through `cpu_attn_reshape_and_cache` and reading them back.
    """
    from vllm._custom_ops import cpu_attn_reshape_and_cache

    tokens = torch.arange(block_size).view(block_size, 1, 1).expand(block_size, 1, head_size)
    channels = torch.arange(head_size).view(1, 1, head_size).expand(block_size, 1, head_size)
    region = 2 * block_size * head_size

    def read_back(values: torch.Tensor) -> torch.Tensor:
        cache = torch.full((1, 1, block_size, 2 * head_size), -1, dtype=dtype)
        key_cache, value_cache = cache.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        values = values.to(dtype).contiguous()
        cpu_attn_reshape_and_cache(
            values, values, key_cache, value_cache, torch.arange(block_size), isa
        )
        flat = cache.view(region).to(torch.float32)
        if (flat < 0).any():
            raise RuntimeError(f"CPU KV packing for isa={isa!r} left cache elements unwritten")
        return flat.to(torch.long)

    def decode(index: torch.Tensor) -> torch.Tensor:
        value = torch.zeros(region, dtype=torch.long)
        scale, remaining = 1, index
        while True:
            value += read_back(remaining % PROBE_BASE) * scale
            remaining = torch.div(remaining, PROBE_BASE, rounding_mode="floor")
            scale *= PROBE_BASE
            if int(remaining.max()) == 0:
                return value

    token_at = decode(tokens)
    channel_at = decode(channels)
    half = torch.arange(region) >= block_size * head_size
    offsets = torch.empty((2, block_size, head_size), dtype=torch.long)
    offsets[half.long(), token_at, channel_at] = torch.arange(region)
    if sorted(offsets.flatten().tolist()) != list(range(region)):
        raise RuntimeError(f"CPU KV packing for isa={isa!r} is not a permutation")
    return offsets


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
        # permutation[(kv * block_size + t) * D + d] = packed position of (kv, t, d)
        self.permutation = self.offsets.flatten()

    def _unpack_blocks(self, cache: torch.Tensor, slots: torch.Tensor):
        """The whole blocks holding `slots`, token-major: `[U, heads, 2, block_size, D]`."""
        blocks, positions = _split_slots(slots, self.block_size)
        unique, which = torch.unique(blocks, return_inverse=True)
        packed = cache.view(cache.shape[0], self.heads, -1)[unique]
        # One contiguous index_select per block beats per-element indexing by ~15x here.
        rows = packed.index_select(2, self.permutation)
        shape = (len(unique), self.heads, 2, self.block_size, self.head_size)
        return unique, which, positions, rows.view(shape)

    def gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        _, which, positions, rows = self._unpack_blocks(cache, slots)
        # which [T] and positions [T] are split by slices: result [T, heads, 2, D]
        return rows[which, :, :, positions, :].permute(2, 0, 1, 3).contiguous()

    def scatter(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Writes exactly the given rows, nothing else in their blocks.

        The forward may be writing other tokens of the same block at that moment (a pipelined
        load runs beside it), so partial blocks are written element by element; blocks the rows
        cover entirely are packed whole, which is ~15x faster.
        """
        rows = rows.to(cache.dtype)
        blocks, positions = _split_slots(slots, self.block_size)
        unique, which, counts = torch.unique(blocks, return_inverse=True, return_counts=True)
        whole = counts[which] == self.block_size
        flat = cache.view(cache.shape[0], self.heads, -1)
        if whole.any():
            full_blocks = unique[counts == self.block_size]
            index = torch.searchsorted(full_blocks, blocks[whole])
            unpacked = torch.empty(
                (len(full_blocks), self.heads, 2, self.block_size, self.head_size),
                dtype=cache.dtype,
            )
            unpacked[index, :, :, positions[whole], :] = rows[:, whole].permute(1, 2, 0, 3)
            packed = torch.empty((len(full_blocks), self.heads, self.permutation.numel()),
                                 dtype=cache.dtype)  # fmt: skip
            packed.index_copy_(2, self.permutation, unpacked.view(len(full_blocks), self.heads, -1))
            flat[full_blocks] = packed
        if not whole.all():
            part = ~whole
            offsets = self.offsets[:, positions[part], :]  # [2, T, D]
            flat[blocks[part].view(1, -1, 1), :, offsets] = rows[:, part].permute(0, 1, 3, 2)


@dataclass
class LatentLayout(KVLayout):
    """MLA: one latent vector per token, token-major, `[blocks, (1,) block_size, width]`.

    Used by vLLM's CPU MLA backends and, with the same indexing, the CUDA MLA backends
    (FlashMLA, Triton MLA: `[num_blocks, block_size, kv_lora_rank + rope_dim]`).
    """

    head_size: int
    block_size: int
    heads: int = 1
    kv: int = 1

    def __post_init__(self) -> None:
        self.name = "mla-latent"

    def gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        rows = cache.reshape(-1, self.head_size)[slots.to(cache.device)]
        return rows.view(1, -1, 1, self.head_size)

    def scatter(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        flat = cache.view(-1, self.head_size)
        flat[slots.to(cache.device)] = rows.reshape(-1, self.head_size).to(flat)


@dataclass
class KvFirstLayout(KVLayout):
    """CUDA FlashAttention-style cache: `[2, blocks, block_size, heads, head_size]`.

    Written from vLLM's flash_attn backend (`get_kv_cache_shape`); no GPU runs here, so only
    its indexing is tested (on CPU tensors of that shape).
    """

    heads: int
    head_size: int
    block_size: int
    kv: int = 2

    def __post_init__(self) -> None:
        self.name = "kv-first"

    def gather(self, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        blocks, positions = _split_slots(slots.to(cache.device), self.block_size)
        return cache[:, blocks, positions]

    def scatter(self, cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        blocks, positions = _split_slots(slots.to(cache.device), self.block_size)
        cache[:, blocks, positions] = rows.to(cache)


def layout_for(
    cache: torch.Tensor, *, use_mla: bool, heads: int, head_size: int, block_size: int
) -> KVLayout:
    """Picks the adapter for one layer's cache tensor, from the model's facts and the device."""
    if use_mla:
        return LatentLayout(head_size=cache.shape[-1], block_size=block_size)
    if cache.device.type == "cpu":
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = _get_attn_isa(cache.dtype, block_size, head_size)
        return CpuPackedLayout(heads, head_size, block_size, isa, cache.dtype)
    if cache.dim() == 5 and cache.shape[0] == 2:
        return KvFirstLayout(heads, head_size, block_size)
    raise NotImplementedError(f"no KV layout adapter for a cache of shape {tuple(cache.shape)}")
