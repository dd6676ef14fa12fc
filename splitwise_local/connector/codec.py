"""A chunk tensor <-> the bytes stored under its key: the serde's payload plus checksums.

Every chunk carries one xxh3 digest per layer in its header's `meta`, computed from the KV the
engine wrote. With a lossless serde the reader recomputes them, so a flipped byte anywhere in
the store (or a chunk written for another layout) is a `CorruptChunk`, never wrong attention.
"""

from __future__ import annotations

import torch
import xxhash

LOSSLESS_SERDES = frozenset({"naive"})


class CorruptChunk(ValueError):
    """A stored chunk that cannot be used: bad payload, wrong shape, checksum mismatch."""


def layer_checksums(kv: torch.Tensor) -> list[str]:
    """One xxh3 digest per layer of a `[layers, kv, tokens, heads, D]` chunk."""
    data = kv.detach().to("cpu").contiguous()
    return [xxhash.xxh3_64_hexdigest(layer.view(torch.uint8).numpy()) for layer in data]


class ChunkCodec:
    """Encodes chunks with one serde; decodes whatever serde wrote a payload."""

    def __init__(self, serde_name: str, options=None) -> None:
        from splitwise_local.serde import make_serde

        self.serde = make_serde(serde_name, options)
        self.lossless = serde_name in LOSSLESS_SERDES

    def encode(self, kv: torch.Tensor) -> bytes:
        meta = {"checksums": layer_checksums(kv), "lossless": self.lossless}
        return self.serde.encode(kv, meta)

    @staticmethod
    def decode(data, expected_shape: tuple[int, ...]) -> torch.Tensor:
        """The chunk's tensor; for `naive` a view of `data` (valid while `data` is)."""
        from splitwise_local.serde import SerdeError, decode_any

        try:
            kv, meta = decode_any(data)
        except SerdeError as exc:
            raise CorruptChunk(str(exc)) from exc
        if tuple(kv.shape) != expected_shape:
            raise CorruptChunk(f"chunk shape {tuple(kv.shape)}, expected {expected_shape}")
        if meta.get("lossless") and layer_checksums(kv) != meta.get("checksums"):
            raise CorruptChunk("chunk checksum mismatch")
        return kv
