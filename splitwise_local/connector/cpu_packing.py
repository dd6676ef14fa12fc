"""How vLLM's CPU attention kernel packs a block of KV, found by asking the kernel itself.

The CPU attention backend does not store a block token by token: `cpu_attn_reshape_and_cache`
packs each (block, head) as `[2 * block_size, head_size]` elements in an ISA-dependent order
(`vec`, `amx`, ...). Rather than hard-coding those orders, `probe_cpu_packing` asks vLLM's
own kernel where it writes each (token, channel), and that permutation is the source of truth.
For power-of-two block and head sizes every packing seen (vec, vec16, amx) permutes the *bits*
of the (token, channel) index; `HalfPacking` finds that bit permutation in the probe's answer,
checks that it reproduces the probe exactly, and turns it into a reshape + axis permutation, so
a whole block moves in one strided copy (`layout.CpuPackedLayout`). Tokens of partly covered
blocks, and shapes where no bit permutation exists, go element by element through the probed
offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

PROBE_BASE = 64  # digits below 64 are exact in every float dtype the cache may use


@lru_cache(maxsize=16)
def probe_cpu_packing(
    isa: str, block_size: int, head_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Where vLLM's CPU kernel puts K and V of (token, channel) inside one (block, head).

    Returns a long tensor `[2, block_size, head_size]` of offsets into the flattened
    `[2 * block_size * head_size]` region: [0] for K, [1] for V. Found by writing each digit of
    the token and channel indices through `cpu_attn_reshape_and_cache` and reading them back.
    """
    # vLLM's CPU kernels: imported when a CPU cache is adapted, so that GPU machines without
    # vLLM (scripts/gpu_check.sh) can import the adapters.
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


@dataclass(frozen=True)
class _Run:
    """Consecutive bits of the token or channel index that stay consecutive when packed."""

    field: str  # "t" or "d"
    low: int  # lowest bit, within its field
    bits: int
    packed_low: int  # where its lowest bit lands in the packed offset


class HalfPacking:
    """One half's (K's or V's) packing as a reshape + axis permutation of `[tokens, D]`.

    Only built when the probed offsets of the half permute the bits of `t * D + d`: the runs
    of bits that stay together become the axes of a view, packed = those axes reordered.
    """

    def __init__(self, runs: list[_Run], heads: int) -> None:
        t_runs = sorted((r for r in runs if r.field == "t"), key=lambda r: -r.low)
        d_runs = sorted((r for r in runs if r.field == "d"), key=lambda r: -r.low)
        # Token-major source view: [n, *t digits, heads, *d digits], most significant first.
        self.source_sizes = [1 << r.bits for r in t_runs] + [heads] + [1 << r.bits for r in d_runs]
        source_axis = {r: 1 + i for i, r in enumerate(t_runs)}
        source_axis |= {r: 2 + len(t_runs) + i for i, r in enumerate(d_runs)}
        packed = sorted(runs, key=lambda r: -r.packed_low)
        self.packed_sizes = [heads] + [1 << r.bits for r in packed]
        self.order = [0, 1 + len(t_runs)] + [source_axis[r] for r in packed]

    @classmethod
    def from_offsets(cls, offsets: torch.Tensor, heads: int) -> HalfPacking | None:
        """The bit permutation behind `offsets` ([tokens, D] -> packed position), if any."""
        tokens, width = offsets.shape
        t_bits, d_bits = tokens.bit_length() - 1, width.bit_length() - 1
        if tokens != 1 << t_bits or width != 1 << d_bits:
            return None
        flat = offsets.flatten()
        images = [int(flat[1 << bit]) for bit in range(t_bits + d_bits)]
        if any(x <= 0 or x & (x - 1) for x in images) or int(flat[0]) != 0:
            return None
        positions = [x.bit_length() - 1 for x in images]
        index = torch.arange(flat.numel())
        bits = (((index >> bit) & 1) << pos for bit, pos in enumerate(positions))
        rebuilt = sum(bits, torch.zeros_like(index))
        if not torch.equal(rebuilt, flat):
            return None
        runs: list[_Run] = []
        for bit, pos in enumerate(positions):
            field, low = ("d", bit) if bit < d_bits else ("t", bit - d_bits)
            last = runs[-1] if runs else None
            if last and last.field == field and last.packed_low + last.bits == pos:
                runs[-1] = _Run(field, last.low, last.bits + 1, last.packed_low)
            else:
                runs.append(_Run(field, low, 1, pos))
        return cls(runs, heads)

    def pack(self, source: torch.Tensor, packed: torch.Tensor) -> None:
        """`source` `[n, tokens, heads, D]` (a view) into `packed` `[n, heads, tokens * D]`."""
        n = source.shape[0]
        view = source.reshape(n, *self.source_sizes).permute(self.order)
        packed.view(n, *self.packed_sizes).copy_(view)

    def unpack(self, packed: torch.Tensor, out: torch.Tensor) -> None:
        """The inverse of `pack`: `packed` `[n, heads, tokens * D]` into `out` (a view)."""
        n = out.shape[0]
        out.view(n, *self.source_sizes).permute(self.order).copy_(
            packed.view(n, *self.packed_sizes)
        )
