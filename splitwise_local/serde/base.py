"""The serde interface and the self-describing payload header every serde writes.

A serde turns one KV chunk (`[num_layers, kv, num_tokens, num_heads, head_size]`, token-major,
kv=2 for K then V, kv=1 for an MLA latent) into bytes for the store and back. The header says
which serde wrote the payload and with which parameters, so a reader decodes whatever a writer
used, and anything it cannot trust (bad magic, unknown version, truncation, a checksum or
shape mismatch) is a `SerdeError`: the connector turns that into a miss and recomputes.

Payload layout (little-endian; the body starts 64-byte aligned so it can be viewed in place):

    offset 0   4s   magic b"SWKV"
           4   u16  format version (1)
           6   u16  reserved, 0
           8   u32  length of the JSON header text in bytes
          12   u32  xxh32 of the JSON header text
          16   u64  body length in bytes
          24   JSON header text (UTF-8), then zero padding up to a multiple of 64
         ...   body: the serde's own bytes

The JSON header holds `serde` (name), `params` (the serde's parameters), `dtype`, `shape`,
`meta` (a small dict the caller passes through, e.g. the connector's per-layer checksums) and
`body_xxh3` (hex digest of the body, or null for serdes that leave integrity to the caller).
"""

from __future__ import annotations

import json
import struct
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import xxhash

MAGIC = b"SWKV"
VERSION = 1
PREFIX = struct.Struct("<4sHHIIQ")
ALIGN = 64
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
MLA_ROPE_DIM = 64  # DeepSeek-style MLA: the last 64 of 576 dims carry RoPE, the rest the latent
CPU_BLOCK_ELEMENTS = 1 << 18  # float32 temporaries of ~1 MiB stay in cache and in malloc's pool


class SerdeError(ValueError):
    """A payload that cannot be decoded, or a tensor that cannot be encoded; says why."""


@dataclass(frozen=True)
class Header:
    """What a payload says about itself."""

    serde: str
    params: dict[str, Any]
    dtype: torch.dtype
    shape: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return torch.Size(self.shape).numel()


def dtype_name(dtype: torch.dtype) -> str:
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise SerdeError(f"unsupported KV dtype {dtype}; expected one of {', '.join(DTYPES)}")


def check_chunk(kv: torch.Tensor) -> None:
    """Rejects tensors that are not a KV chunk, before any work is done on them."""
    if kv.dim() != 5:
        raise SerdeError(
            "expected a KV chunk [num_layers, kv, num_tokens, num_heads, head_size], "
            f"got shape {tuple(kv.shape)}"
        )
    if kv.shape[1] not in (1, 2):
        raise SerdeError(f"kv dimension must be 2 (K, V) or 1 (MLA latent), got {kv.shape[1]}")
    if kv.numel() == 0:
        raise SerdeError(f"empty KV chunk {tuple(kv.shape)}")
    dtype_name(kv.dtype)


def channel_segments(shape: Sequence[int]) -> list[tuple[int, int]]:
    """Channel ranges (of heads * head_size) whose values share a scale: one per head, or for an
    MLA latent the 512 normalised latent dims and the 64 RoPE dims apart."""
    _, kv, _, heads, size = shape
    if kv == 1 and heads == 1 and size > MLA_ROPE_DIM:
        return [(0, size - MLA_ROPE_DIM), (size - MLA_ROPE_DIM, size)]
    return [(h * size, (h + 1) * size) for h in range(heads)]


def layer_blocks(num_layers: int, per_layer: int, device: torch.device) -> list[slice]:
    """Layer ranges to process at once. On the CPU, small blocks keep the float32 temporaries in
    cache (and away from fresh page-faulting allocations), which is 1.5-2x faster than whole
    chunks; on a GPU one block keeps the launch count down."""
    step = num_layers if device.type != "cpu" else max(1, CPU_BLOCK_ELEMENTS // per_layer)
    return [slice(start, min(start + step, num_layers)) for start in range(0, num_layers, step)]


def header_bytes(header: Header, body_len: int, digest: str | None) -> bytes:
    """The fixed prefix, the JSON text and the padding that put the body on a 64-byte boundary."""
    try:
        text = json.dumps(
            {
                "serde": header.serde,
                "params": header.params,
                "dtype": dtype_name(header.dtype),
                "shape": list(header.shape),
                "meta": header.meta,
                "body_xxh3": digest,
            },
            sort_keys=True,
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
    except (TypeError, ValueError) as exc:
        raise SerdeError(f"meta must be a JSON-serialisable dict: {exc}") from None
    padding = -(PREFIX.size + len(text)) % ALIGN
    prefix = PREFIX.pack(MAGIC, VERSION, 0, len(text), xxhash.xxh32_intdigest(text), body_len)
    return b"".join([prefix, text, bytes(padding)])


def pack_payload(header: Header, body: Sequence[Any], hash_body: bool) -> bytes:
    """Header + body parts (bytes-like objects, concatenated) as one payload, copying each once."""
    views = [memoryview(part).cast("B") for part in body]
    digest = None
    if hash_body:
        hasher = xxhash.xxh3_64()
        for v in views:
            hasher.update(v)
        digest = hasher.hexdigest()
    return b"".join([header_bytes(header, sum(v.nbytes for v in views), digest), *views])


def read_payload(data: bytes | bytearray | memoryview) -> tuple[Header, memoryview]:
    """Parses and checks a payload; returns its header and a zero-copy view of its body."""
    view = memoryview(data).cast("B")
    if view.nbytes < PREFIX.size:
        raise SerdeError(f"truncated payload: {view.nbytes} bytes, no room for a header")
    magic, version, _, text_len, text_hash, body_len = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise SerdeError(f"not a KV payload: bad magic {magic!r}")
    if version != VERSION:
        raise SerdeError(f"unsupported payload version {version} (this reader knows {VERSION})")
    start = PREFIX.size + text_len
    body_start = start + (-start % ALIGN)
    if view.nbytes != body_start + body_len:
        raise SerdeError(
            f"truncated or padded payload: {view.nbytes} bytes, header says {body_start + body_len}"
        )
    text = view[PREFIX.size : start]
    if xxhash.xxh32_intdigest(text) != text_hash:
        raise SerdeError("corrupt payload header: checksum mismatch")
    try:
        fields = json.loads(bytes(text))
        header = Header(
            serde=str(fields["serde"]),
            params=dict(fields["params"]),
            dtype=DTYPES[fields["dtype"]],
            shape=tuple(int(d) for d in fields["shape"]),
            meta=dict(fields["meta"]),
        )
        digest = fields["body_xxh3"]
    except (ValueError, KeyError, TypeError) as exc:
        raise SerdeError(f"corrupt payload header: {exc!r}") from None
    if len(header.shape) != 5 or min(header.shape) <= 0 or header.shape[1] not in (1, 2):
        raise SerdeError(f"payload header has an invalid KV shape {header.shape}")
    body = view[body_start:]
    if digest is not None and xxhash.xxh3_64_hexdigest(body) != digest:
        raise SerdeError("corrupt payload body: checksum mismatch")
    return header, body


def view_tensor(body: memoryview, dtype: torch.dtype, offset: int, count: int) -> torch.Tensor:
    """`count` elements of `dtype` at `offset` in `body`, without copying, checked for length.

    The tensor aliases the buffer: it is valid while the buffer lives, and must not be written
    when the buffer is read-only (bytes). torch warns once about read-only buffers; that warning
    is silenced here because every caller honours this contract.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if offset + count * itemsize > body.nbytes:
        raise SerdeError(
            f"truncated payload body: need {offset + count * itemsize} bytes, have {body.nbytes}"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(body, dtype=dtype, offset=offset, count=count)


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU byte view of a tensor (copied off the GPU if it lives there) for `pack_payload`."""
    flat = tensor.detach().contiguous().reshape(-1).cpu()
    return flat.view(torch.uint8).numpy().data


class Serde(ABC):
    """Encodes KV chunks to self-describing bytes and back.

    Subclasses set `name`, say whether the body carries a checksum (`hash_body`), and implement
    `params` (recorded in the header), `encode_body` and the classmethod `decode_body`, which
    reads its parameters from the header, never from the instance: a reader decodes whatever a
    writer used.
    """

    name: ClassVar[str]
    hash_body: ClassVar[bool] = True

    @abstractmethod
    def params(self, kv: torch.Tensor) -> dict[str, Any]:
        """The parameters a reader needs, as recorded in the header."""

    @abstractmethod
    def encode_body(self, kv: torch.Tensor, params: dict[str, Any]) -> list[Any]:
        """The body as a list of bytes-like parts (concatenated by `pack_payload`)."""

    @classmethod
    @abstractmethod
    def decode_body(cls, header: Header, body: memoryview, device: torch.device) -> torch.Tensor:
        """The chunk, of `header.shape` and `header.dtype`, on `device`."""

    def encode(self, kv: torch.Tensor, meta: dict[str, Any] | None = None) -> bytes:
        check_chunk(kv)
        params = self.params(kv)
        header = Header(self.name, params, kv.dtype, tuple(kv.shape), dict(meta or {}))
        return pack_payload(header, self.encode_body(kv, params), self.hash_body)

    def decode(
        self, data: bytes | bytearray | memoryview, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        header, body = read_payload(data)
        if header.serde != self.name:
            raise SerdeError(f"payload was written by serde {header.serde!r}, not {self.name!r}")
        return self.decode_checked(header, body, device)

    @classmethod
    def decode_checked(
        cls, header: Header, body: memoryview, device: str | torch.device
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Runs `decode_body`, turning malformed parameters into a SerdeError."""
        try:
            kv = cls.decode_body(header, body, torch.device(device))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            if isinstance(exc, SerdeError):
                raise
            raise SerdeError(f"corrupt {cls.name} payload: {exc!r}") from None
        return kv, header.meta
