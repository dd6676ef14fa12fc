"""A chunk tensor <-> the bytes stored under its key: the serde's payload plus its seal.

With a secret (the store's auth token) every chunk is sealed with a MAC, AES-GMAC under a key
derived from the secret and the chunk's store key, over the payload's header fields and every
body byte, with a fresh random nonce; its nonce and tag ride in the header's `meta`. The reader
recomputes it, so a chunk written by anyone without the token, or moved from another key, or
with any byte changed, is a `CorruptChunk` and its tokens are recomputed. GMAC is a real MAC
that runs at memcpy speed with AES-NI and carry-less multiply (every x86-64 and aarch64
server), about 1.5x the cost of xxh3 checksums; a MAC over the xxh3 digests alone would be
cheaper but worth no more than xxh3, which an adversary can collide.

Without a secret, every chunk carries one xxh3 digest per layer instead, computed from the KV
the engine wrote. With a lossless serde the reader recomputes them, so a flipped byte
anywhere in the store (or a chunk written for another layout) is a `CorruptChunk`, never
wrong attention. A reader with a secret refuses unsealed chunks; a reader without one
refuses sealed chunks, which it cannot check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from splitwise_local.serde import SERDES, Header, SerdeError, make_serde
from splitwise_local.serde.base import check_chunk, dtype_name, pack_payload, read_payload

if TYPE_CHECKING:
    from splitwise_local.config import SerdeOptions
    from splitwise_local.store.backend import Value

LOSSLESS_SERDES = frozenset({"naive"})
_NONCE = 12  # bytes: GCM's native nonce
_PERSON = b"splitwise-kvmac"  # separates the MAC's key derivation from any other use of it


class CorruptChunk(ValueError):
    """A stored chunk that cannot be used: bad payload, wrong shape, checksum or MAC mismatch."""


def layer_checksums(kv: torch.Tensor) -> list[str]:
    """One xxh3 digest per layer of a `[layers, kv, tokens, heads, D]` chunk."""
    data = kv.detach().to("cpu").contiguous()
    return [xxhash.xxh3_64_hexdigest(layer.view(torch.uint8).numpy()) for layer in data]


class Sealer:
    """AES-GMAC under keys derived from one secret; a chunk's key is bound into its MAC."""

    def __init__(self, secret: str) -> None:
        self._root = hashlib.blake2b(secret.encode(), digest_size=32, person=_PERSON).digest()

    def tag(self, key: str, nonce: bytes, header: Header, body: Sequence[Any]) -> bytes:
        subkey = hashlib.blake2b(key.encode(), digest_size=16, key=self._root).digest()
        mac = Cipher(algorithms.AES(subkey), modes.GCM(nonce)).encryptor()
        mac.authenticate_additional_data(_described(header))
        for part in body:
            mac.authenticate_additional_data(part)
        mac.finalize()
        return mac.tag

    def seal(self, key: str, header: Header, body: Sequence[Any]) -> dict[str, str]:
        nonce = os.urandom(_NONCE)
        return {"nonce": nonce.hex(), "tag": self.tag(key, nonce, header, body).hex()}

    def check(self, key: str, header: Header, body: memoryview) -> None:
        seal = header.meta.get("mac")
        if not isinstance(seal, dict):
            raise CorruptChunk("chunk is not sealed with this store's token")
        try:
            nonce, tag = bytes.fromhex(seal["nonce"]), bytes.fromhex(seal["tag"])
        except (KeyError, TypeError, ValueError):
            raise CorruptChunk("chunk seal is malformed") from None
        if len(nonce) != _NONCE or not hmac.compare_digest(
            self.tag(key, nonce, header, [body]), tag
        ):
            raise CorruptChunk("chunk MAC mismatch: not written with this store's token")


def _described(header: Header) -> bytes:
    """The header's fields as the MAC covers them: all but the seal itself."""
    meta = {name: value for name, value in header.meta.items() if name != "mac"}
    fields = {
        "serde": header.serde,
        "params": header.params,
        "dtype": dtype_name(header.dtype),
        "shape": list(header.shape),
        "meta": meta,
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class ChunkCodec:
    """Encodes chunks with one serde; decodes whatever serde wrote a payload. With `secret`,
    seals what it encodes and accepts only chunks sealed under the same secret and key."""

    def __init__(
        self,
        serde_name: str = "naive",
        options: SerdeOptions | None = None,
        secret: str | None = None,
    ) -> None:
        self.serde = make_serde(serde_name, options)
        self.lossless = serde_name in LOSSLESS_SERDES
        self._sealer = Sealer(secret) if secret else None

    def encode(self, kv: torch.Tensor, key: str | None = None) -> bytes:
        """The payload stored under `key` (needed, and bound into the MAC, with a secret)."""
        check_chunk(kv)
        params = self.serde.params(kv)
        body = self.serde.encode_body(kv, params)
        meta: dict[str, Any] = {"lossless": self.lossless}
        if self._sealer is None:
            meta["checksums"] = layer_checksums(kv)
        header = Header(self.serde.name, params, kv.dtype, tuple(kv.shape), meta)
        if self._sealer is not None:
            if key is None:
                raise ValueError("a sealing codec needs the chunk's store key")
            body = [memoryview(part).cast("B") for part in body]
            seal = self._sealer.seal(key, header, body)
            header = Header(header.serde, params, kv.dtype, header.shape, {**meta, "mac": seal})
        return pack_payload(header, body, self.serde.hash_body)

    def decode(
        self, data: Value, expected_shape: tuple[int, ...], key: str | None = None
    ) -> torch.Tensor:
        """The chunk's tensor; for `naive` a view of `data` (valid while `data` is)."""
        try:
            header, body = read_payload(data)
            cls = SERDES.get(header.serde)
            if cls is None:
                raise SerdeError(f"payload was written by unknown serde {header.serde!r}")
            if tuple(header.shape) != expected_shape:
                raise CorruptChunk(f"chunk shape {tuple(header.shape)}, expected {expected_shape}")
            if self._sealer is not None:
                if key is None:
                    raise ValueError("a sealing codec needs the chunk's store key")
                self._sealer.check(key, header, body)
            elif "mac" in header.meta:
                raise CorruptChunk("chunk is sealed, and this reader has no token to check it")
            kv, meta = cls.decode_checked(header, body, "cpu")
        except SerdeError as exc:
            raise CorruptChunk(str(exc)) from exc
        if tuple(kv.shape) != expected_shape:
            raise CorruptChunk(f"chunk shape {tuple(kv.shape)}, expected {expected_shape}")
        lossless = self._sealer is None and meta.get("lossless")
        if lossless and layer_checksums(kv) != meta.get("checksums"):
            raise CorruptChunk("chunk checksum mismatch")
        return kv
