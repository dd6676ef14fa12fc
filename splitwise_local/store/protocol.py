"""The store's wire format: frame header, opcodes, status codes and the metadata codecs.

Pure encoding and decoding, no sockets, so the server, the sync client and the asyncio client
share one definition and docs/wire-format.md has one place to be checked against. Every frame
starts with the 4-byte magic `SWKV`; LMCache's `lm://` protocol starts with a native int32
command in 1..5, so the first four bytes of a connection tell the two protocols apart.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Any, NamedTuple

from splitwise_local.store.errors import (
    AuthError,
    ProtocolError,
    StoreError,
    StoreFull,
    StoreUnavailable,
    ValueTooLarge,
)

#
# Store wire protocol version
#
# Increment VERSION whenever an existing frame changes meaning: a header field, a metadata
# encoding, an opcode's request or response, or what a status obliges the client to do. New
# opcodes, flag bits, status codes and JSON fields, and tighter limits, do not change it: a
# server answers what it does not know with BAD_FRAME, readers ignore unknown JSON fields and
# clients map an unknown status to a plain StoreError.
#
# Version history:
#   1: HELLO, PUT, GET, EXISTS, DELETE, STATS; the shared-memory opcodes ATTACH, ALLOC,
#      COMMIT, ABORT, LEASE; the BEST_EFFORT flag. Later, without a version change: LMCache's
#      own protocol on the same port (told apart by the first four bytes); the NO_TOUCH flag
#      (EXISTS); limits on what a peer may cost the store (HELLO metadata at most
#      MAX_HELLO_META, a whole-frame deadline, connection caps refused with status BUSY, PUT
#      memory reserved as its bytes arrive); STATS `tiers` (each tier's numbers: DRAM, and the
#      disk tier below it when the store has one).
#
VERSION = 1

MAGIC = b"SWKV"
HEADER = struct.Struct("<4sBBHII")  # magic, version, opcode|status, flags, count, meta_len
MAX_COUNT = 65536  # items in one batch
MAX_META = 16 * 1024 * 1024  # bytes of metadata in one frame
MAX_HELLO_META = 4096  # bytes of HELLO metadata: read before the token is checked
MAX_KEY = 512  # bytes of one key

_U16 = struct.Struct("<H")
_U64 = struct.Struct("<Q")
_EXTENT = struct.Struct("<QQ")  # offset, length
_GRANT = struct.Struct("<qQI")  # value length (-1: miss), ticket, number of extents
_COMMIT = struct.Struct("<QQ")  # ticket, value length; then the key


class Op(IntEnum):
    """Request opcodes. 1-15 work on any connection; 16+ need the Unix control socket."""

    HELLO = 1
    PUT = 2
    GET = 3
    EXISTS = 4
    DELETE = 5
    STATS = 6
    ATTACH = 16
    ALLOC = 17
    COMMIT = 18
    ABORT = 19
    LEASE = 20


SHM_OPS = frozenset({Op.ATTACH, Op.ALLOC, Op.COMMIT, Op.ABORT, Op.LEASE})


class Flag(IntFlag):
    """Request flags; unknown bits are refused so they stay free for later versions."""

    BEST_EFFORT = 1  # ALLOC: answer length -1 for a value that finds no room, not an error
    NO_TOUCH = 2  # EXISTS: leave the keys' LRU order as it is (a router's probe is no use)


class Status(IntEnum):
    """Response status; anything but OK carries a UTF-8 message and ends the connection."""

    OK = 0
    BAD_FRAME = 1
    UNSUPPORTED_VERSION = 2
    AUTH_FAILED = 3
    VALUE_TOO_LARGE = 4
    STORE_FULL = 5
    BAD_REQUEST = 6
    INTERNAL = 7
    BUSY = 8  # too many connections: refused before anything was read


class FrameError(ProtocolError):
    """A frame the peer sent that breaks the format; `status` is what the server answers."""

    def __init__(self, message: str, status: Status = Status.BAD_FRAME) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Header:
    code: int  # an Op in requests, a Status in responses
    count: int
    meta_len: int
    flags: int = 0


class Grant(NamedTuple):
    """A value's place in the shared arena, handed to a Unix-socket client (ALLOC, LEASE)."""

    length: int  # bytes it holds; -1: missing key (LEASE), no room (best-effort ALLOC)
    ticket: int  # names the allocation in COMMIT / ABORT
    extents: list[tuple[int, int]]  # (offset, length) in the arena, in value order


def encode_header(code: int, count: int = 0, meta_len: int = 0, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, code, flags, count, meta_len)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Checks magic, version and limits; raises FrameError naming what is wrong."""
    magic, version, code, flags, count, meta_len = HEADER.unpack(data)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise FrameError(
            f"unsupported version {version}, this side speaks {VERSION}",
            Status.UNSUPPORTED_VERSION,
        )
    if count > MAX_COUNT:
        raise FrameError(f"count {count} exceeds {MAX_COUNT}")
    if meta_len > MAX_META:
        raise FrameError(f"metadata length {meta_len} exceeds {MAX_META}")
    if flags & ~int(Flag.BEST_EFFORT | Flag.NO_TOUCH):
        raise FrameError(f"unknown flags {flags:#x}")
    return Header(code, count, meta_len, flags)


def frame(code: int, count: int = 0, meta: bytes = b"", flags: int = 0) -> bytes:
    return encode_header(code, count, len(meta), flags) + meta


def key_bytes(key: str | bytes) -> bytes:
    """Keys travel as bytes; the API's hex-digest strings are UTF-8 encoded."""
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if not 0 < len(raw) <= MAX_KEY:
        raise ValueError(f"key must be 1..{MAX_KEY} bytes, got {len(raw)}")
    return raw


class _Reader:
    """Walks a metadata buffer; any overrun is a FrameError, never an IndexError."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise FrameError("metadata shorter than its items")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size))

    def key(self) -> bytes:
        (size,) = self.unpack(_U16)
        if not 0 < size <= MAX_KEY:
            raise FrameError(f"key length {size} outside 1..{MAX_KEY}")
        return bytes(self.take(size))

    def done(self) -> None:
        if self.pos != len(self.data):
            raise FrameError(f"{len(self.data) - self.pos} stray bytes after the items")


def encode_keys(keys: Sequence[bytes]) -> bytes:
    return b"".join(_U16.pack(len(k)) + k for k in keys)


def decode_keys(meta: bytes | memoryview, count: int) -> list[bytes]:
    reader = _Reader(meta)
    keys = [reader.key() for _ in range(count)]
    reader.done()
    return keys


def encode_sized_keys(items: Sequence[tuple[bytes, int]]) -> bytes:
    return b"".join(_U16.pack(len(k)) + k + _U64.pack(n) for k, n in items)


def decode_sized_keys(meta: bytes | memoryview, count: int) -> list[tuple[bytes, int]]:
    reader = _Reader(meta)
    items = [(reader.key(), reader.unpack(_U64)[0]) for _ in range(count)]
    reader.done()
    return items


def encode_lengths(lengths: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(lengths)}q", *lengths)


def decode_lengths(meta: bytes | memoryview, count: int) -> list[int]:
    if len(meta) != 8 * count:
        raise FrameError(f"expected {count} lengths, got {len(meta)} bytes")
    return list(struct.unpack(f"<{count}q", meta))


def encode_u64s(numbers: Sequence[int]) -> bytes:
    """Tickets (ABORT) and sizes (ALLOC)."""
    return struct.pack(f"<{len(numbers)}Q", *numbers)


def decode_u64s(meta: bytes | memoryview, count: int) -> list[int]:
    if len(meta) != 8 * count:
        raise FrameError(f"expected {count} numbers, got {len(meta)} bytes")
    return list(struct.unpack(f"<{count}Q", meta))


def encode_commits(items: Sequence[tuple[int, bytes, int]]) -> bytes:
    """COMMIT: (ticket, key, length) per value."""
    return b"".join(
        _COMMIT.pack(ticket, length) + _U16.pack(len(key)) + key for ticket, key, length in items
    )


def decode_commits(meta: bytes | memoryview, count: int) -> list[tuple[int, bytes, int]]:
    reader = _Reader(meta)
    items = []
    for _ in range(count):
        ticket, length = reader.unpack(_COMMIT)
        items.append((ticket, reader.key(), length))
    reader.done()
    return items


def encode_grants(grants: Sequence[Grant]) -> bytes:
    parts = []
    for grant in grants:
        parts.append(_GRANT.pack(grant.length, grant.ticket, len(grant.extents)))
        parts.extend(_EXTENT.pack(*extent) for extent in grant.extents)
    return b"".join(parts)


def decode_grants(meta: bytes | memoryview, count: int) -> list[Grant]:
    reader = _Reader(meta)
    grants = []
    for _ in range(count):
        length, ticket, n = reader.unpack(_GRANT)
        extents = [reader.unpack(_EXTENT) for _ in range(n)]
        grants.append(Grant(length, ticket, extents))
    reader.done()
    return grants


def encode_json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def decode_json(meta: bytes | memoryview) -> dict[str, Any]:
    try:
        value = json.loads(bytes(meta))
    except ValueError as exc:
        raise FrameError(f"metadata is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError("metadata JSON is not an object")
    return value


def error_for(status: int, message: str) -> StoreError:
    """The client-side exception for an error response."""
    kinds: dict[int, type[StoreError]] = {
        Status.AUTH_FAILED: AuthError,
        Status.VALUE_TOO_LARGE: ValueTooLarge,
        Status.STORE_FULL: StoreFull,
        Status.BUSY: StoreUnavailable,
        Status.BAD_FRAME: ProtocolError,
        Status.UNSUPPORTED_VERSION: ProtocolError,
    }
    name = Status(status).name if status in Status._value2member_map_ else str(status)
    return kinds.get(status, StoreError)(f"store refused ({name}): {message}")
