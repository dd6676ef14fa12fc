"""`naive`: the chunk's raw bytes behind the header, one copy to encode and none to decode.

Encoding copies the tensor's bytes once, into the payload. `encode` returns new `bytes`, whose
fresh pages cost the kernel a page fault each (several times the copy itself, for a chunk of
megabytes); `encode_into` writes the payload into a buffer the caller owns and reuses, such as
the store's shared-memory slot, so that the one copy is the one the store needs anyway.

Decoding on the CPU returns a tensor that *views* the payload buffer (no copy): it stays valid
while that buffer lives, and when the buffer is read-only (`bytes`) the tensor must only be
read, which is all the connector does (it copies the chunk into the paged KV cache). Decoding
to another device copies once, there.

The body carries no checksum: hashing costs about as much as the copy itself and would halve
the throughput; the connector's per-layer checksums in `meta` cover the values instead.
"""

from __future__ import annotations

from typing import Any

import torch

from splitwise_local.serde.base import (
    Header,
    Serde,
    SerdeError,
    as_bytes,
    check_chunk,
    header_bytes,
    view_tensor,
)


class NaiveSerde(Serde):
    name = "naive"
    hash_body = False

    def params(self, kv: torch.Tensor) -> dict[str, Any]:
        return {}

    def encode_body(self, kv: torch.Tensor, params: dict[str, Any]) -> list[Any]:
        return [as_bytes(kv)]

    def encode_into(
        self, kv: torch.Tensor, out: bytearray | memoryview, meta: dict[str, Any] | None = None
    ) -> int:
        """Writes the payload of `kv` at the start of the writable buffer `out` (the tensor is
        copied once, straight from its device); returns the payload's length."""
        check_chunk(kv)
        header = Header(self.name, {}, kv.dtype, tuple(kv.shape), dict(meta or {}))
        head = header_bytes(header, kv.numel() * kv.element_size(), None)
        view = memoryview(out).cast("B")
        size = len(head) + kv.numel() * kv.element_size()
        if view.readonly or view.nbytes < size:
            raise SerdeError(f"encode_into needs a writable buffer of {size} bytes")
        view[: len(head)] = head
        view_tensor(view, kv.dtype, len(head), kv.numel()).view(kv.shape).copy_(kv)
        return size

    @classmethod
    def decode_body(cls, header: Header, body: memoryview, device: torch.device) -> torch.Tensor:
        itemsize = torch.empty(0, dtype=header.dtype).element_size()
        if body.nbytes != header.numel * itemsize:
            raise SerdeError(
                f"naive payload holds {body.nbytes} bytes, shape {header.shape} needs "
                f"{header.numel * itemsize}"
            )
        kv = view_tensor(body, header.dtype, 0, header.numel).view(header.shape)
        return kv if device.type == "cpu" else kv.to(device)
