"""`cachegen`: CacheGen (Liu et al., SIGCOMM 2024) KV encoding, with `constriction` for coding.

Three steps, as in the paper:
1. Layer-wise quantization. Every value becomes an integer level `round(x / step)`. The step is
   shared by the channels of one (layer, K/V, head) -- for an MLA latent, by the 512 latent dims
   and by the 64 RoPE dims apart -- and is `std * 2**(2 - bits)`, where `bits` follows a
   per-layer schedule that gives the shallow layers more. A shared step is the MSE-optimal
   choice once symbols are entropy coded: wide channels just use more levels. Values get one
   refinement: a token whose values are much smaller than its head's typical ones (attention
   sinks are) gets a step 2**-r finer, r in 0..15 stored per (layer, token, head), because
   attention can weigh such a token heavily and an error on it is not small relative to it.
2. Delta against an anchor. Tokens are grouped in runs of `group_size`; a token's level is
   coded as its difference to its group's first token (the anchor), and each anchor as its
   difference to the previous anchor. Whether that beats coding the levels directly depends on
   the channel (RoPE's slowly turning key dims gain, most others lose), so each channel takes
   the cheaper of the two, flagged by one bit.
3. Entropy coding with per-channel categorical models. Each (layer, K/V, channel) gets its own
   distribution: its symbol range is cut into at most `max_bins` bins of a power-of-two width,
   the bin counts are stored as 4-bit log2 values, the bin of each symbol is coded with an
   asymmetric numeral system coder (`constriction.stream.stack.AnsCoder`) under that model and
   the offset within the bin -- uniform under the model -- as plain bits. Keeping the coded
   alphabets at 16 symbols keeps the coder fast.

Steps 1 and 2 (and their inverses) are vectorised torch on the chunk's device, CPU or CUDA; the
entropy coder runs on the CPU (constriction has no GPU coder), so symbols cross to the host.
constriction is imported where the coder runs (`ans_encode`, `ans_decode`): the registry
imports this module everywhere, and a machine that moves only naive chunks need not have it.

Body layout (little-endian; "rows" are channels in (layer, kv, channel) order):
    u32 x3     number of delta-coded rows, of bin-table entries, of coded 32-bit words
    f32        steps [layers, kv, segments]
    u32        ANS-coded bins
    i16        per row: its lowest symbol
    u16        per row: its symbol span - 1
    i16        per delta-coded row: its first level
    u8         per row: delta flag, np.packbits order
    u8         bin tables, 4-bit entries, two a byte, low nibble first
    u8         value step refinements [layers, tokens, heads], 4-bit entries (kv=2 only)
    u8         in-bin offsets: rows grouped by offset width, ascending; each group's offsets
               [rows, tokens] as bit planes [width, rows * tokens], np.packbits little-endian
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from splitwise_local.serde.base import Header, Serde, SerdeError, channel_segments

MAX_BINS = 16
BITS_RANGE = range(1, 13)
LEVEL_LIMIT = 1 << 13  # |level| <= 8192, so levels and deltas fit int16
MAX_REFINE = 15
COUNTS = struct.Struct("<III")


def layer_bits_schedule(num_layers: int, bits: int) -> list[int]:
    """CacheGen's rule of thumb: the first third of the layers gets one bit more than the rest."""
    return [bits + 1 if 3 * i < num_layers else bits for i in range(num_layers)]


def checked_params(params: dict[str, Any], num_layers: int) -> tuple[list[int], int, int]:
    layer_bits = params.get("layer_bits")
    group, bins = params.get("group_size"), params.get("max_bins")
    if (
        not isinstance(layer_bits, list)
        or len(layer_bits) != num_layers
        or not all(isinstance(b, int) and b in BITS_RANGE for b in layer_bits)
        or not isinstance(group, int)
        or group <= 0
        or not isinstance(bins, int)
        or not 2 <= bins <= MAX_BINS
    ):
        raise SerdeError(f"invalid cachegen parameters for {num_layers} layers: {params}")
    return layer_bits, group, bins


def segment_index(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """For each channel (heads * head_size), the index of its step segment."""
    index = torch.empty(shape[3] * shape[4], dtype=torch.long, device=device)
    for i, (start, stop) in enumerate(channel_segments(shape)):
        index[start:stop] = i
    return index


def quantization_steps(
    x: torch.Tensor, shape: Sequence[int], layer_bits: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps [layers, kv, segments] (std * 2**(2 - bits), floored to keep levels in range) and,
    for K/V chunks, the value refinements r [layers, tokens, heads] in 0..MAX_REFINE: a token's
    values are quantized with its head's step times 2**-r, r = log2(head std / token RMS)."""
    segments = channel_segments(shape)
    variance, peak = x.var(dim=2, correction=0), x.abs().amax(dim=2)
    sigma = torch.stack([variance[..., a:b].mean(-1).sqrt() for a, b in segments], -1)
    peak = torch.stack([peak[..., a:b].amax(-1) for a, b in segments], -1)
    resolution = torch.tensor(layer_bits, dtype=torch.float32, device=x.device)
    steps = torch.maximum(sigma * torch.exp2(2 - resolution)[:, None, None], peak / LEVEL_LIMIT)
    if not bool(torch.isfinite(steps).all()):
        raise SerdeError("KV values are not finite")
    steps = torch.where(steps > 0, steps, 1.0)
    if shape[1] == 1:
        return steps, None
    layers, _, tokens, heads, _ = shape
    values = x[:, 1].view(layers, tokens, heads, -1)
    tiny = torch.finfo(torch.float32).tiny
    rms = values.pow(2).mean(-1).sqrt().clamp_min(tiny)
    token_peak = values.abs().amax(-1).clamp_min(tiny)
    head_sigma, head_step = sigma[:, 1, None, :], steps[:, 1, None, :]
    wanted = torch.round(torch.log2(head_sigma.clamp_min(tiny) / rms))
    allowed = torch.floor(torch.log2(head_step * LEVEL_LIMIT / token_peak))
    return steps, torch.minimum(wanted, allowed).clamp(0, MAX_REFINE).to(torch.uint8)


def element_steps(
    steps: torch.Tensor, refine: torch.Tensor | None, shape: Sequence[int]
) -> torch.Tensor:
    """The step of every element, as a [layers, kv, tokens or 1, channels] tensor."""
    layers, kvs, tokens, heads, size = shape
    per_channel = steps[..., segment_index(shape, steps.device)][:, :, None, :]
    if refine is None:
        return per_channel
    out = per_channel.expand(layers, kvs, tokens, heads * size).clone()
    scale = torch.exp2(-refine.float()).repeat_interleave(size, dim=-1)  # [layers, tokens, C]
    out[:, 1] *= scale
    return out


def anchor_reference(levels: torch.Tensor, group: int) -> torch.Tensor:
    """What each level is coded against in delta mode: its group's anchor, or for an anchor
    the previous anchor; the very first level refers to itself (stored apart as the base)."""
    anchors = levels[:, ::group]
    ref = anchors.repeat_interleave(group, dim=1)[:, : levels.shape[1]]
    ref[:, group::group] = anchors[:, :-1]
    ref[:, 0] = levels[:, 0]
    return ref


def undo_anchor_deltas(deltas: torch.Tensor, base: torch.Tensor, group: int) -> torch.Tensor:
    """The inverse of `levels - anchor_reference(levels)`, given each row's first level."""
    deltas = deltas.clone()
    deltas[:, 0] = base
    anchors = deltas[:, ::group].cumsum(1, dtype=deltas.dtype)
    levels = deltas + anchors.repeat_interleave(group, dim=1)[:, : deltas.shape[1]]
    levels[:, ::group] = anchors
    return levels


class BinModel:
    """Per-row models: a row's symbol span cut into at most `max_bins` bins of width 2**shift."""

    def __init__(self, low: torch.Tensor, span: torch.Tensor, max_bins: int) -> None:
        self.low, self.span = low, span
        need = (span + max_bins - 1) // max_bins  # the narrowest width that fits
        self.shift = torch.where(
            need > 1, torch.floor(torch.log2((need - 1).double())).to(span.dtype) + 1, 0
        )
        self.bins = ((span - 1) >> self.shift) + 1

    @classmethod
    def fit(
        cls, symbols: torch.Tensor, max_bins: int
    ) -> tuple[BinModel, torch.Tensor, torch.Tensor]:
        """Each row's model, its 4-bit log2 bin counts, and its coded size in bits."""
        low = symbols.amin(1)
        model = cls(low, symbols.amax(1) - low + 1, max_bins)
        index = (symbols - low[:, None]) >> model.shift[:, None]
        counts = torch.zeros(symbols.shape[0], max_bins, dtype=torch.float32, device=symbols.device)
        counts.scatter_add_(1, index.long(), torch.ones_like(index, dtype=torch.float32))
        table = torch.where(counts > 0, (counts.log2().round() + 1).clamp(1, 15), 0).to(torch.uint8)
        weights = torch.where(table > 0, torch.exp2(table.float() - 1), 0.0)
        p = weights / weights.sum(1, keepdim=True)
        bits = -(counts * torch.log2(torch.where(counts > 0, p, 1.0))).sum(1)
        return model, table, bits + symbols.shape[1] * model.shift + 4 * model.bins

    def row_weights(self, tables: np.ndarray) -> list[np.ndarray | None]:
        """Each row's bin weights from the rows' concatenated 4-bit tables (None for a single
        bin, which costs 0 bits); powers of two in float64 are the same everywhere."""
        bins = self.bins.cpu().numpy()
        ends = np.cumsum(bins)
        if ends.size and int(ends[-1]) != tables.size:
            raise SerdeError("corrupt cachegen payload: bin tables disagree with symbol ranges")
        weights = np.where(tables > 0, np.exp2(tables.astype(np.float64) - 1), 0.0)
        return [
            weights[end - n : end] if n > 1 else None
            for n, end in zip(bins.tolist(), ends.tolist(), strict=True)
        ]


def ans_encode(bins: np.ndarray, weights: list[np.ndarray | None]) -> np.ndarray:
    """Every row's bins under its categorical model, on one ANS stack: the coded u32 words."""
    import constriction  # cachegen's coder alone needs it (see the module's docstring)

    coder = constriction.stream.stack.AnsCoder()
    categorical = constriction.stream.model.Categorical
    for row in range(len(weights) - 1, -1, -1):  # a stack: encode backwards, decode forwards
        row_weights = weights[row]
        if row_weights is not None:
            coder.encode_reverse(bins[row], categorical(row_weights, perfect=False))
    words: np.ndarray = coder.get_compressed()
    return words


def ans_decode(words: np.ndarray, weights: list[np.ndarray | None], tokens: int) -> np.ndarray:
    """The inverse of `ans_encode`: `[rows, tokens]` bins, 0 in the rows of a single bin."""
    import constriction  # cachegen's coder alone needs it (see the module's docstring)

    bins = np.zeros((len(weights), tokens), dtype=np.int32)
    coder = constriction.stream.stack.AnsCoder(words)
    categorical = constriction.stream.model.Categorical
    coded = [row for row, row_weights in enumerate(weights) if row_weights is not None]
    if coded:
        bins[coded] = np.stack(
            [coder.decode(categorical(weights[row], perfect=False), tokens) for row in coded]
        )
    if not coder.is_empty():
        raise SerdeError("corrupt cachegen payload: coded words left over")
    return bins


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    flat = values.astype(np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    return np.stack((packed & 15, packed >> 4), axis=1).reshape(-1)[:count]


def offset_groups(shift: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(width in bits, row mask) for each offset width in use, ascending."""
    return [(int(k), shift == k) for k in np.unique(shift) if k > 0]


def pack_offsets(offsets: np.ndarray, shift: np.ndarray) -> list[np.ndarray]:
    """Per offset width: the group's offsets as bit planes (all lowest bits, then the next...),
    so that packing and unpacking are whole-array operations."""
    parts = []
    for width, rows in offset_groups(shift):
        values = offsets[rows].reshape(-1)
        planes = np.stack([(values >> i) & 1 for i in range(width)]).astype(np.uint8)
        parts.append(np.packbits(planes, axis=None, bitorder="little"))
    return parts


def offset_bytes(shift: np.ndarray, tokens: int) -> list[int]:
    return [-(-int(rows.sum()) * tokens * width // 8) for width, rows in offset_groups(shift)]


def unpack_offsets(parts: list[np.ndarray], shift: np.ndarray, tokens: int) -> np.ndarray:
    offsets = np.zeros((shift.size, tokens), dtype=np.int32)
    for (width, rows), part in zip(offset_groups(shift), parts, strict=True):
        count = int(rows.sum()) * tokens
        planes = np.unpackbits(part, count=count * width, bitorder="little").reshape(width, count)
        values = planes[0].astype(np.int32)
        for i in range(1, width):
            values |= planes[i].astype(np.int32) << i
        offsets[rows] = values.reshape(-1, tokens)
    return offsets


class CacheGenSerde(Serde):
    name = "cachegen"

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 32,
        layer_bits: Sequence[int] | None = None,
        max_bins: int = MAX_BINS,
    ) -> None:
        if bits not in BITS_RANGE or group_size <= 0 or not 2 <= max_bins <= MAX_BINS:
            raise SerdeError(f"invalid cachegen options bits={bits} group_size={group_size}")
        self.bits, self.group_size, self.max_bins = bits, group_size, max_bins
        self.layer_bits = list(layer_bits) if layer_bits is not None else None

    def params(self, kv: torch.Tensor) -> dict[str, Any]:
        layer_bits = self.layer_bits or layer_bits_schedule(kv.shape[0], self.bits)
        params = {
            "layer_bits": layer_bits,
            "group_size": self.group_size,
            "max_bins": self.max_bins,
        }
        checked_params(params, kv.shape[0])
        return params

    def encode_body(self, kv: torch.Tensor, params: dict[str, Any]) -> list[Any]:
        layer_bits, group, max_bins = checked_params(params, kv.shape[0])
        layers, kvs, tokens, heads, size = kv.shape
        x = kv.reshape(layers, kvs, tokens, heads * size).float()
        steps, refine = quantization_steps(x, kv.shape, layer_bits)
        levels = torch.round(x / element_steps(steps, refine, kv.shape)).to(torch.int32)
        levels = levels.permute(0, 1, 3, 2).reshape(-1, tokens)  # one row per channel
        deltas = levels - anchor_reference(levels, group)
        raw_model, raw_table, raw_bits = BinModel.fit(levels, max_bins)
        delta_model, delta_table, delta_bits = BinModel.fit(deltas, max_bins)
        use_delta = delta_bits + 16 < raw_bits
        model = BinModel(
            torch.where(use_delta, delta_model.low, raw_model.low),
            torch.where(use_delta, delta_model.span, raw_model.span),
            max_bins,
        )
        table = torch.where(use_delta[:, None], delta_table, raw_table)
        tables = table[torch.arange(max_bins, device=kv.device)[None] < model.bins[:, None]]
        shifted = torch.where(use_delta[:, None], deltas, levels) - model.low[:, None]
        shift = model.shift[:, None]
        bins = (shifted >> shift).cpu().numpy()
        offsets = (shifted & ((1 << shift) - 1)).cpu().numpy()
        words = ans_encode(bins, model.row_weights(tables.cpu().numpy()))
        base = levels[use_delta, 0]
        parts = [
            COUNTS.pack(int(base.numel()), int(tables.numel()), int(words.size)),
            steps.cpu().numpy().astype("<f4"),
            words.astype("<u4"),
            model.low.cpu().numpy().astype("<i2"),
            (model.span - 1).cpu().numpy().astype("<u2"),
            base.cpu().numpy().astype("<i2"),
            np.packbits(use_delta.cpu().numpy()),
            pack_nibbles(tables.cpu().numpy()),
        ]
        if refine is not None:
            parts.append(pack_nibbles(refine.cpu().numpy()))
        return parts + pack_offsets(offsets, model.shift.cpu().numpy())

    @classmethod
    def decode_body(cls, header: Header, body: memoryview, device: torch.device) -> torch.Tensor:
        layers, kvs, tokens, heads, size = header.shape
        _, group, max_bins = checked_params(header.params, layers)
        rows = layers * kvs * heads * size
        reader = BodyReader(body)
        n_delta, n_tables, n_words = reader.struct(COUNTS)
        segments = len(channel_segments(header.shape))
        steps = reader.array("<f4", layers * kvs * segments).reshape(layers, kvs, segments)
        words = reader.array("<u4", n_words)
        low = torch.from_numpy(reader.array("<i2", rows).astype(np.int32))
        span = torch.from_numpy(reader.array("<u2", rows).astype(np.int32) + 1)
        base = torch.from_numpy(reader.array("<i2", n_delta).astype(np.int32))
        use_delta = np.unpackbits(reader.array("u1", -(-rows // 8)), count=rows).astype(bool)
        tables = unpack_nibbles(reader.array("u1", -(-n_tables // 2)), n_tables)
        refine: torch.Tensor | None = None
        if kvs == 2:
            count = layers * tokens * heads
            nibbles = unpack_nibbles(reader.array("u1", -(-count // 2)), count)
            refine = torch.from_numpy(nibbles.reshape(layers, tokens, heads).copy()).to(device)
        model = BinModel(low, span, max_bins)
        shift = model.shift.numpy()
        offset_parts = [reader.array("u1", n) for n in offset_bytes(shift, tokens)]
        reader.finish()
        if int(use_delta.sum()) != n_delta:
            raise SerdeError("corrupt cachegen payload: delta flags disagree with their count")
        bins = ans_decode(words, model.row_weights(tables), tokens)
        symbols = (bins << shift[:, None]) + unpack_offsets(offset_parts, shift, tokens)
        levels = torch.from_numpy(symbols).to(device) + low.to(device)[:, None]
        if n_delta:
            delta_rows = torch.from_numpy(use_delta).to(device)
            levels[delta_rows] = undo_anchor_deltas(levels[delta_rows], base.to(device), group)
        levels = levels.view(layers, kvs, heads * size, tokens).transpose(2, 3)
        x = levels * element_steps(torch.tensor(steps, device=device), refine, header.shape)
        return x.to(header.dtype).reshape(header.shape)


class BodyReader:
    """Reads consecutive typed arrays from a body, with a SerdeError if it runs short."""

    def __init__(self, body: memoryview) -> None:
        self.body, self.offset = body, 0

    def take(self, nbytes: int) -> memoryview:
        if self.offset + nbytes > self.body.nbytes:
            raise SerdeError(f"truncated cachegen payload: body is {self.body.nbytes} bytes")
        part = self.body[self.offset : self.offset + nbytes]
        self.offset += nbytes
        return part

    def struct(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def array(self, dtype: str, count: int) -> np.ndarray:
        kind = np.dtype(dtype)
        return np.frombuffer(self.take(kind.itemsize * count), dtype=kind)

    def finish(self) -> None:
        if self.offset != self.body.nbytes:
            raise SerdeError(f"cachegen payload has {self.body.nbytes - self.offset} stray bytes")
