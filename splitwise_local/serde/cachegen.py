"""`cachegen`: CacheGen (Liu et al., SIGCOMM 2024) KV encoding, with `constriction` for coding.

Three steps, as in the paper:
1. Layer-wise quantization. Every value becomes an integer level `round(x / step)`. The step is
   shared by the channels of one (layer, K/V, head) -- for an MLA latent, of the 512 latent dims
   and of the 64 RoPE dims apart -- and is `std * 2**(2 - bits)`, where `bits` comes from a
   per-layer schedule that gives shallow layers more bits than deep ones (their errors propagate
   through more of the model). A shared step is the MSE-optimal choice when the symbols are
   entropy coded: wide channels simply use more levels instead of forcing a coarse grid on
   every channel.
2. Delta against an anchor. Tokens are grouped in runs of `group_size`; each token's level is
   coded as its difference to its group's first token (the anchor), and each anchor as its
   difference to the previous anchor. Whether that beats coding the levels directly depends on
   the channel (RoPE's slowly rotating dims gain, the rest lose), so each channel takes the
   cheaper of the two, flagged by one bit.
3. Entropy coding with per-channel categorical models. Each (layer, K/V, channel) gets its own
   distribution over its symbols: a histogram over at most `max_bins` equal-width bins of its
   symbol range, counts stored as 4-bit log2 values in the payload. The symbols are then coded
   with an asymmetric numeral system coder (`constriction.stream.stack.AnsCoder`).

Steps 1 and 2 (and their inverses) are vectorised torch on the chunk's device, CPU or CUDA;
the entropy coder runs on the CPU (constriction has no GPU coder), so symbols cross to the host.

Body layout (little-endian):
    u32 x3     number of delta-coded channels, of table nibbles, of coded 32-bit words
    f32        steps [layers, kv, segments]
    u32        ANS-coded words
    i16        per channel (layer, kv, channel order): its lowest symbol
    u16        per channel: its symbol span - 1
    i16        first level of each delta-coded channel, in channel order
    u8         delta flags, np.packbits order
    u8         bin tables, two 4-bit entries a byte, low nibble first
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import constriction
import numpy as np
import torch

from splitwise_local.serde.base import Header, Serde, SerdeError, channel_segments

MAX_BINS = 16
BITS_RANGE = range(1, 13)
LEVEL_LIMIT = 1 << 13  # |level| <= 8192, so levels and deltas fit int16
COUNTS = struct.Struct("<III")


def layer_bits_schedule(num_layers: int, bits: int) -> list[int]:
    """CacheGen's rule of thumb: the first third of the layers gets one bit more than `bits`,
    the last third one bit less (at least 2)."""
    third = num_layers / 3
    return [
        bits + 1 if i < third else bits if i < 2 * third else max(2, bits - 1)
        for i in range(num_layers)
    ]


def checked_params(params: dict[str, Any], num_layers: int) -> tuple[list[int], int, int]:
    layer_bits, group, bins = (
        params.get("layer_bits"),
        params.get("group_size"),
        params.get("max_bins"),
    )
    if (
        not isinstance(layer_bits, list)
        or len(layer_bits) != num_layers
        or not all(isinstance(b, int) and b in BITS_RANGE for b in layer_bits)
        or not isinstance(group, int)
        or group <= 0
        or not isinstance(bins, int)
        or not 1 <= bins <= MAX_BINS
    ):
        raise SerdeError(f"invalid cachegen parameters for {num_layers} layers: {params}")
    return layer_bits, group, bins


def segment_index(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """For each channel (heads * head_size), the index of its step segment."""
    index = torch.empty(shape[3] * shape[4], dtype=torch.long, device=device)
    for i, (start, stop) in enumerate(channel_segments(shape)):
        index[start:stop] = i
    return index


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
    """Per-row categorical models: 4-bit log2 counts over equal-width bins of each row's range."""

    def __init__(self, low: torch.Tensor, span: torch.Tensor, max_bins: int) -> None:
        self.low, self.span = low, span  # span = number of symbols in the row's range
        self.width = (span + max_bins - 1) // max_bins
        self.bins = (span + self.width - 1) // self.width

    @classmethod
    def fit(
        cls, symbols: torch.Tensor, max_bins: int
    ) -> tuple[BinModel, torch.Tensor, torch.Tensor]:
        """The model for each row of `symbols`, its log2 count table, and its cost in bits."""
        low = symbols.amin(1)
        model = cls(low, symbols.amax(1) - low + 1, max_bins)
        index = (symbols - low[:, None]) // model.width[:, None]
        counts = torch.zeros(symbols.shape[0], max_bins, dtype=torch.float32, device=symbols.device)
        counts.scatter_add_(1, index.long(), torch.ones_like(index, dtype=torch.float32))
        table = torch.where(counts > 0, (counts.log2().round() + 1).clamp(1, 15), 0).to(torch.uint8)
        weights = model.weights(table)
        mass = (weights * model.width[:, None]).sum(1, keepdim=True)
        bits = -(counts * torch.log2(torch.where(counts > 0, weights / mass, 1.0))).sum(1)
        return model, table, bits + 4 * model.bins

    @staticmethod
    def weights(table: torch.Tensor) -> torch.Tensor:
        return torch.where(table > 0, torch.exp2(table.float() - 1), 0.0)

    def categoricals(
        self, tables: np.ndarray
    ) -> list[constriction.stream.model.Categorical | None]:
        """Each row's constriction model (None for a row with a single symbol, coded in 0 bits),
        from the rows' concatenated bin tables. Powers of two in float64: bit-identical on every
        machine, as the coder requires."""
        span, width, bins = (t.cpu().numpy() for t in (self.span, self.width, self.bins))
        if int(bins.sum()) != tables.size:
            raise SerdeError("corrupt cachegen payload: bin tables disagree with symbol ranges")
        weights = np.where(tables > 0, np.exp2(tables.astype(np.float64) - 1), 0.0)
        ends = np.cumsum(bins)
        models: list[constriction.stream.model.Categorical | None] = []
        categorical = constriction.stream.model.Categorical
        for n, w, end, b in zip(
            span.tolist(), width.tolist(), ends.tolist(), bins.tolist(), strict=True
        ):
            if n == 1:
                models.append(None)
                continue
            row = weights[end - b : end]
            models.append(categorical(row if w == 1 else np.repeat(row, w)[:n], perfect=False))
        return models


def pack_nibbles(values: torch.Tensor) -> np.ndarray:
    flat = values.to(torch.uint8).cpu().numpy()
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return flat[0::2] | (flat[1::2] << 4)


def unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    return np.stack((packed & 15, packed >> 4), axis=1).reshape(-1)[:count]


class CacheGenSerde(Serde):
    name = "cachegen"

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 32,
        layer_bits: Sequence[int] | None = None,
        max_bins: int = MAX_BINS,
    ) -> None:
        if bits not in BITS_RANGE or group_size <= 0 or not 1 <= max_bins <= MAX_BINS:
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
        segments = channel_segments(kv.shape)
        variance = x.var(dim=2, correction=0)
        peak = x.abs().amax(dim=2)
        sigma = torch.stack([variance[..., a:b].mean(-1).sqrt() for a, b in segments], -1)
        peak = torch.stack([peak[..., a:b].amax(-1) for a, b in segments], -1)
        resolution = torch.tensor(layer_bits, dtype=torch.float32, device=kv.device)
        steps = sigma * torch.exp2(2 - resolution)[:, None, None]
        steps = torch.maximum(steps, peak / LEVEL_LIMIT)
        if not bool(torch.isfinite(steps).all()):
            raise SerdeError("KV values are not finite")
        steps = torch.where(steps > 0, steps, 1.0)
        row_steps = steps[..., segment_index(kv.shape, kv.device)]  # [layers, kv, channels]
        levels = torch.round(x / row_steps[:, :, None, :]).to(torch.int32)
        levels = levels.permute(0, 1, 3, 2).reshape(-1, tokens)  # one row per channel
        deltas = levels - anchor_reference(levels, group)
        raw_model, raw_table, raw_bits = BinModel.fit(levels, max_bins)
        delta_model, delta_table, delta_bits = BinModel.fit(deltas, max_bins)
        use_delta = delta_bits + 16 < raw_bits
        symbols = torch.where(use_delta[:, None], deltas, levels)
        model = BinModel(
            torch.where(use_delta, delta_model.low, raw_model.low),
            torch.where(use_delta, delta_model.span, raw_model.span),
            max_bins,
        )
        table = torch.where(use_delta[:, None], delta_table, raw_table)
        nibbles = table[torch.arange(max_bins, device=kv.device)[None] < model.bins[:, None]]
        shifted = (symbols - model.low[:, None]).cpu().numpy()
        coder = constriction.stream.stack.AnsCoder()
        models = model.categoricals(nibbles.cpu().numpy())
        for row in range(len(models) - 1, -1, -1):  # a stack: encode backwards, decode forwards
            if models[row] is not None:
                coder.encode_reverse(shifted[row], models[row])
        words = coder.get_compressed()
        base = levels[use_delta, 0]
        return [
            COUNTS.pack(int(base.numel()), int(nibbles.numel()), int(words.size)),
            steps.cpu().numpy().astype("<f4"),
            words.astype("<u4"),
            model.low.to(torch.int16).cpu().numpy().astype("<i2"),
            (model.span - 1).to(torch.int32).cpu().numpy().astype("<u2"),
            base.to(torch.int16).cpu().numpy().astype("<i2"),
            np.packbits(use_delta.cpu().numpy()),
            pack_nibbles(nibbles),
        ]

    @classmethod
    def decode_body(cls, header: Header, body: memoryview, device: torch.device) -> torch.Tensor:
        layers, kvs, tokens, heads, size = header.shape
        _, group, max_bins = checked_params(header.params, layers)
        rows = layers * kvs * heads * size
        segments = len(channel_segments(header.shape))
        reader = BodyReader(body)
        n_delta, n_nibbles, n_words = reader.struct(COUNTS)
        steps = reader.array("<f4", layers * kvs * segments).reshape(layers, kvs, segments)
        words = reader.array("<u4", n_words)
        low = reader.array("<i2", rows).astype(np.int32)
        span = reader.array("<u2", rows).astype(np.int32) + 1
        base = reader.array("<i2", n_delta)
        use_delta = np.unpackbits(reader.array("u1", -(-rows // 8)), count=rows).astype(bool)
        table = unpack_nibbles(reader.array("u1", -(-n_nibbles // 2)), n_nibbles)
        reader.finish()
        if int(use_delta.sum()) != n_delta:
            raise SerdeError("corrupt cachegen payload: delta flags disagree with their count")
        model = BinModel(torch.from_numpy(low), torch.from_numpy(span), max_bins)
        shifted = np.zeros((rows, tokens), dtype=np.int32)
        coder = constriction.stream.stack.AnsCoder(words)
        for row, categorical in enumerate(model.categoricals(table)):
            if categorical is not None:
                shifted[row] = coder.decode(categorical, tokens)
        if not coder.is_empty():
            raise SerdeError("corrupt cachegen payload: coded words left over")
        symbols = torch.from_numpy(shifted).to(device) + model.low.to(device)[:, None]
        delta_rows = torch.from_numpy(use_delta).to(device)
        if n_delta:
            base_levels = torch.from_numpy(base.astype(np.int32)).to(device)
            symbols[delta_rows] = undo_anchor_deltas(symbols[delta_rows], base_levels, group)
        row_steps = torch.tensor(steps, device=device)[..., segment_index(header.shape, device)]
        x = symbols.view(layers, kvs, heads * size, tokens) * row_steps[..., None]
        return x.transpose(2, 3).to(header.dtype).reshape(header.shape)


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

    def struct(self, layout: struct.Struct) -> tuple:
        return layout.unpack(self.take(layout.size))

    def array(self, dtype: str, count: int) -> np.ndarray:
        kind = np.dtype(dtype)
        return np.frombuffer(self.take(kind.itemsize * count), dtype=kind)

    def finish(self) -> None:
        if self.offset != self.body.nbytes:
            raise SerdeError(f"cachegen payload has {self.body.nbytes - self.offset} stray bytes")
