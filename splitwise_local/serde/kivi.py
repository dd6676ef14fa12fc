"""`kivi`: KIVI (Liu et al., ICML 2024) asymmetric integer quantization of a KV chunk.

Keys have a few channels with large magnitudes, so keys are quantized per channel: each group is
`group_size` consecutive tokens of one channel. Values have no such channels but vary from token
to token, so values are quantized per token: each group is `group_size` consecutive channels of
one token. An MLA latent (kv=1) is quantized like keys: per channel, which also keeps its RoPE
dims apart from the latent. Each group stores a scale and a zero point (its minimum) in fp16, and
its values as `bits`-bit codes (2, 4 or 8), packed tightly into bytes.

Body layout (all sizes follow from the header's shape and params):
    key scales, key zeros      fp16 [layers, ceil(tokens / group), channels]
    value scales, value zeros  fp16 [layers, tokens, ceil(channels / group)]   (kv=2 only)
    codes                      uint8: the codes [layers, kv, tokens, channels], planar packed:
                               with k = 8 // bits codes a byte and M = ceil(n / k) bytes,
                               byte j holds codes j, M + j, 2M + j, ... from low bits to high.
Planar packing keeps every shift a contiguous vector op, on CPU and GPU alike.

The work is vectorised torch on whatever device the tensor is on; on the CPU it runs over small
blocks of layers so the float32 temporaries stay in cache (see `layer_blocks`).
"""

from __future__ import annotations

from typing import Any

import torch

from splitwise_local.serde.base import (
    Header,
    Serde,
    SerdeError,
    as_bytes,
    layer_blocks,
    view_tensor,
)

BITS = (2, 4, 8)
PARAM_DTYPE = torch.float16


def group_pieces(length: int, group: int) -> list[tuple[int, int, int]]:
    """(start, stop, group size) runs covering `length`: whole groups, then a shorter remainder."""
    full = length // group * group
    pieces = [(0, full, group)] if full else []
    return pieces + ([(full, length, length - full)] if length > full else [])


def grouped(t: torch.Tensor, dim: int, start: int, stop: int, group: int) -> torch.Tensor:
    """`t[..., start:stop, ...]` along `dim`, split into [..., n_groups, group, ...] (a view)."""
    part = t.narrow(dim, start, stop - start)
    shape = (*part.shape[:dim], (stop - start) // group, group, *part.shape[dim + 1 :])
    return part.view(shape)


def quantize(
    x: torch.Tensor,
    dim: int,
    group: int,
    bits: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
) -> None:
    """Asymmetric min/max quantization of `x` in groups along `dim`, written into `codes`
    (same shape as x) and `scales`/`zeros` (x's shape with `dim` counted in groups)."""
    qmax = (1 << bits) - 1
    first_group = 0
    for start, stop, size in group_pieces(x.shape[dim], group):
        xf = grouped(x, dim, start, stop, size).float()
        low = xf.amin(dim + 1, keepdim=True)
        scale = ((xf.amax(dim + 1, keepdim=True) - low) / qmax).to(PARAM_DTYPE)
        zero = low.to(PARAM_DTYPE)
        n_groups = xf.shape[dim]
        scales.narrow(dim, first_group, n_groups).copy_(scale.squeeze(dim + 1))
        zeros.narrow(dim, first_group, n_groups).copy_(zero.squeeze(dim + 1))
        first_group += n_groups
        # Quantize against the stored (rounded) scale and zero, so decoding matches exactly.
        scale = scale.float()
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.addcmul(-zero.float() * inverse, xf, inverse).round_().clamp_(0, qmax)
        grouped(codes, dim, start, stop, size).copy_(q)


def dequantize(
    codes: torch.Tensor,
    dim: int,
    group: int,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """The inverse of `quantize`: `zero + code * scale`, written into `out` in its dtype."""
    first_group = 0
    for start, stop, size in group_pieces(codes.shape[dim], group):
        q = grouped(codes, dim, start, stop, size)
        n_groups = q.shape[dim]
        scale = scales.narrow(dim, first_group, n_groups).unsqueeze(dim + 1).float()
        zero = zeros.narrow(dim, first_group, n_groups).unsqueeze(dim + 1).float()
        first_group += n_groups
        grouped(out, dim, start, stop, size).copy_(torch.addcmul(zero, q.float(), scale))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Planar packing of a flat uint8 code tensor whose length is a multiple of 8 // bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    planes = codes.view(per_byte, -1)
    packed = planes[0].clone()
    for i in range(1, per_byte):
        packed |= planes[i] << (bits * i)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`: a flat uint8 tensor of len(packed) * (8 // bits) codes."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    mask = (1 << bits) - 1
    planes = torch.empty(per_byte, packed.numel(), dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, mask, out=planes[0])
    for i in range(1, per_byte):
        torch.bitwise_and(packed >> (bits * i), mask, out=planes[i])
    return planes.view(-1)


class Layout:
    """Sizes of a KIVI body, derived from the chunk shape and the parameters."""

    def __init__(self, shape: tuple[int, ...], bits: int, group: int) -> None:
        layers, kv, tokens, heads, size = shape
        self.channels = heads * size
        key_params = (layers, -(-tokens // group), self.channels)
        value_params = (layers, tokens, -(-self.channels // group))
        # Scales and zeros: keys' per channel group, then (kv=2) values' per token group.
        self.param_shapes = [key_params] * 2 + ([value_params] * 2 if kv == 2 else [])
        self.codes = layers * kv * tokens * self.channels
        per_byte = 8 // bits
        self.packed = -(-self.codes // per_byte)
        self.padded_codes = self.packed * per_byte


def checked_params(params: dict[str, Any]) -> tuple[int, int]:
    bits, group = params.get("bits"), params.get("group_size")
    if bits not in BITS or not isinstance(group, int) or group <= 0:
        raise SerdeError(f"invalid kivi parameters {params}")
    return bits, group


class KiviSerde(Serde):
    name = "kivi"

    def __init__(self, bits: int = 4, group_size: int = 32) -> None:
        self.bits, self.group_size = checked_params({"bits": bits, "group_size": group_size})

    def params(self, kv: torch.Tensor) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size}

    def encode_body(self, kv: torch.Tensor, params: dict[str, Any]) -> list[Any]:
        layers, kvs, tokens = kv.shape[:3]
        layout = Layout(tuple(kv.shape), self.bits, self.group_size)
        x = kv.reshape(layers, kvs, tokens, layout.channels)
        codes = torch.empty(layout.padded_codes, dtype=torch.uint8, device=kv.device)
        codes[layout.codes :].zero_()
        grid = codes[: layout.codes].view(x.shape)
        parts = [torch.empty(s, dtype=PARAM_DTYPE, device=kv.device) for s in layout.param_shapes]
        for block in layer_blocks(layers, tokens * layout.channels, kv.device):
            for k, axis in enumerate((1, 2)[:kvs]):  # keys along tokens, values along channels
                scales, zeros = parts[2 * k : 2 * k + 2]
                quantize(
                    x[block, k],
                    axis,
                    self.group_size,
                    self.bits,
                    grid[block, k],
                    scales[block],
                    zeros[block],
                )
        if not all(bool(torch.isfinite(p).all()) for p in parts):
            raise SerdeError("KV values are not finite or exceed the fp16 range of kivi's scales")
        return [as_bytes(p) for p in parts] + [as_bytes(pack_codes(codes, self.bits))]

    @classmethod
    def decode_body(cls, header: Header, body: memoryview, device: torch.device) -> torch.Tensor:
        bits, group = checked_params(header.params)
        layers, kvs, tokens = header.shape[:3]
        layout = Layout(header.shape, bits, group)
        param_shapes = layout.param_shapes
        itemsize = torch.empty(0, dtype=PARAM_DTYPE).element_size()
        expected = sum(torch.Size(s).numel() for s in param_shapes) * itemsize + layout.packed
        if body.nbytes != expected:
            raise SerdeError(f"kivi payload body is {body.nbytes} bytes, expected {expected}")
        parts, offset = [], 0
        for shape in param_shapes:
            count = torch.Size(shape).numel()
            parts.append(view_tensor(body, PARAM_DTYPE, offset, count).view(shape).to(device))
            offset += count * itemsize
        packed = view_tensor(body, torch.uint8, offset, layout.packed).to(device)
        grid = unpack_codes(packed, bits)[: layout.codes].view(layers, kvs, tokens, layout.channels)
        out = torch.empty(grid.shape, dtype=header.dtype, device=device)
        for block in layer_blocks(layers, tokens * layout.channels, device):
            for k, axis in enumerate((1, 2)[:kvs]):
                scales, zeros = parts[2 * k : 2 * k + 2]
                dequantize(grid[block, k], axis, group, scales[block], zeros[block], out[block, k])
        return out.view(header.shape)
