"""KV chunk serdes: `naive` (raw bytes), `kivi` (grouped integer quantization) and `cachegen`
(anchor deltas, per-layer resolution, entropy coding), chosen by the config's `remote_serde`.

    serde = make_serde(config.remote_serde, config.serde_options)
    payload = serde.encode(kv, meta={"checksums": [...]})
    kv, meta = decode_any(payload, device="cuda")   # whatever serde wrote it

Every payload carries a header naming its serde and parameters; `SerdeError` means "treat the
chunk as missing". See `base.py` for the wire layout and each module for its scheme.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from splitwise_local.serde.base import Header, Serde, SerdeError, read_payload
from splitwise_local.serde.cachegen import CacheGenSerde
from splitwise_local.serde.kivi import KiviSerde
from splitwise_local.serde.naive import NaiveSerde

if TYPE_CHECKING:
    from splitwise_local.config import SerdeOptions

SERDES: dict[str, type[Serde]] = {cls.name: cls for cls in (NaiveSerde, KiviSerde, CacheGenSerde)}
# The serdes that `serde_options` (bits, group_size) configure.
QUANTIZING: dict[str, type[KiviSerde | CacheGenSerde]] = {
    cls.name: cls for cls in (KiviSerde, CacheGenSerde)
}

__all__ = [
    "SERDES",
    "CacheGenSerde",
    "Header",
    "KiviSerde",
    "NaiveSerde",
    "Serde",
    "SerdeError",
    "decode_any",
    "make_serde",
]


def make_serde(name: str, options: SerdeOptions | None = None) -> Serde:
    """The serde called `name`, configured from the config's `serde_options` (bits, group_size)."""
    if name == NaiveSerde.name:
        return NaiveSerde()
    cls = QUANTIZING.get(name)
    if cls is None:
        raise SerdeError(f"unknown serde {name!r}; expected one of {', '.join(SERDES)}")
    if options is None:
        return cls()
    return cls(bits=options.bits, group_size=options.group_size)


def decode_any(
    data: bytes | bytearray | memoryview, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Decodes a payload written by any serde, with the parameters its header records."""
    header, body = read_payload(data)
    cls = SERDES.get(header.serde)
    if cls is None:
        raise SerdeError(f"payload was written by unknown serde {header.serde!r}")
    return cls.decode_checked(header, body, device)
