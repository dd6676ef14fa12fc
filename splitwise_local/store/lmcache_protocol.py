"""LMCache's own `lm://` protocol (lmcache 0.5.6, `lmcache/v1/protocol.py`), served by our store.

LMCache's users point its remote connector at `lm://host:port` and expect LMCache's
server there; the store answers on the same port, told apart from our protocol by the first
four bytes (`StoreServer._dispatch`), so one address serves both kinds of client. LMCache
values go into the same arena and index as ours, so capacity, LRU eviction, pins and stats
apply to them unchanged.

Frames (native byte order in LMCache; little-endian on every host it runs on):
- request, 186 bytes: int32 command, length, fmt, dtype, location, shape[4]; a 150-byte key,
  space-padded. PUT is followed by `length` bytes of value and gets no reply.
- reply, 36 bytes: int32 code (200 or 400), length, fmt, dtype, shape[4], location; a GET
  that found its key is followed by `length` bytes of value.

Keys: an LMCache key (`CacheEngineKey.to_string()`, e.g. `model@1@0@4d2@bfloat16`) is stored
under the very same bytes, padding stripped, so our own client's `exists`/`get` of that
string sees the value LMCache put, byte for byte. LMCache keys always contain `@`; the
connector's keys are hex digests, so the two never collide.

The fmt, dtype and shape a value was put with are kept beside it (in its index slot's `tag`,
so they live exactly as long as that stored version of the value, and go to the disk tier and
back with it) and come back in the GET reply; a value our own protocol stored is described as
LMCache's own opaque byte buffer (format BINARY_BUFFER, no dtype, shape [length, 0, 0, 0]).

The store's limits hold here too: the first request must arrive by the connection's pass
deadline and until it has, the connection counts as unauthenticated (the protocol carries no
token; a store with one refuses LMCache clients outright); every request, with its value,
must arrive whole within the frame deadline; a value's pages are reserved as its bytes
arrive (`ValueIntake`).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

from splitwise_local.store.errors import StoreFull, ValueTooLarge
from splitwise_local.store.index import LMCACHE, Slot
from splitwise_local.store.limits import Pass
from splitwise_local.store.session import SessionContext, ValueIntake
from splitwise_local.store.transport import PeerClosed, SocketReader, send_all

log = logging.getLogger(__name__)

MAX_KEY = 150  # lmcache.v1.protocol.MAX_KEY_LENGTH
REQUEST = struct.Struct(f"<9i{MAX_KEY}s")  # ClientMetaMessage
REPLY = struct.Struct("<9i")  # ServerMetaMessage
_TAG = struct.Struct("<6i")  # fmt, dtype, shape: as a slot's tag
SUCCESS = 200  # ServerReturnCode
FAIL = 400
# The ranges LMCache 0.5.6 can decode: MemoryFormat values, DTYPE_TO_INT, LOCATION_TO_INT.
FORMATS = range(9)
DTYPES = range(9)
LOCATIONS = range(3)
BINARY_BUFFER = 5  # LMCache's format for opaque bytes, received into a plain bytearray
NO_DTYPE = 0
_DISCARD_CHUNK = 64 * 1024


class Command(IntEnum):
    """lmcache.v1.protocol.ClientCommand."""

    PUT = 1
    GET = 2
    EXIST = 3
    LIST = 4
    HEALTH = 5


COMMANDS = frozenset(int(command) for command in Command)


class Tag(NamedTuple):
    """What LMCache keeps beside a value and hands back with it."""

    fmt: int
    dtype: int
    shape: tuple[int, int, int, int]

    @classmethod
    def byte_buffer(cls, length: int) -> Tag:
        """A value stored through our protocol: `length` opaque bytes, as LMCache tags them."""
        return cls(BINARY_BUFFER, NO_DTYPE, (length, 0, 0, 0))

    def pack(self) -> bytes:
        return _TAG.pack(self.fmt, self.dtype, *self.shape)

    @classmethod
    def of(cls, slot: Slot) -> Tag:
        """The tag a stored value goes out with."""
        if not slot.tag:
            return cls.byte_buffer(slot.length)
        fmt, dtype, *shape = _TAG.unpack(slot.tag)
        return cls(fmt, dtype, (shape[0], shape[1], shape[2], shape[3]))


class Request(NamedTuple):
    command: Command
    length: int
    tag: Tag
    key: bytes


# LMCache's own server answers misses and status queries with these fields.
_STATUS_TAG = Tag(1, 2, (0, 0, 0, 0))


class MalformedRequest(ValueError):
    """A request LMCache's protocol cannot contain; the connection is closed."""


def speaks_lmcache(first: bytes) -> bool:
    """Whether a connection's first four bytes start an LMCache request (a command 1..5)."""
    return len(first) == 4 and int.from_bytes(first, "little") in COMMANDS


def decode_request(data: bytes) -> Request:
    """Parses and checks one ClientMetaMessage; the key is returned with its padding stripped."""
    command, length, fmt, dtype, location, *shape, raw_key = REQUEST.unpack(data)
    if command not in COMMANDS:
        raise MalformedRequest(f"unknown command {command}")
    key = raw_key.strip()
    if not key:
        raise MalformedRequest("empty key")
    if command == Command.PUT:
        if length < 0 or min(shape) < 0:
            raise MalformedRequest(f"negative length or shape ({length}, {shape})")
        if fmt not in FORMATS or dtype not in DTYPES or location not in LOCATIONS:
            raise MalformedRequest(f"unknown format {fmt}, dtype {dtype} or location {location}")
    return Request(Command(command), length, Tag(fmt, dtype, tuple(shape)), key)


def encode_reply(code: int, length: int = 0, tag: Tag = _STATUS_TAG) -> bytes:
    return REPLY.pack(code, length, tag.fmt, tag.dtype, *tag.shape, 0)


def serve_lmcache(
    ctx: SessionContext, sock: socket.socket, first: bytes, peer: str, ticket: Pass
) -> None:
    """Runs one LMCache connection until it closes; `first` is what the dispatcher read."""
    if ctx.auth_token:
        log.warning(
            "store: refusing LMCache client %s: this store requires a token and "
            "LMCache's protocol cannot carry one",
            peer,
        )
        return
    LMCacheSession(sock, ctx, peer, ticket).serve(first)


class LMCacheSession:
    """One LMCache client connection; anything malformed ends this connection only."""

    def __init__(self, sock: socket.socket, ctx: SessionContext, peer: str, ticket: Pass) -> None:
        self.sock = sock
        self.reader = SocketReader(sock, deadlines=True)
        self.ctx = ctx
        self.index = ctx.index
        self.arena = ctx.arena
        self.peer = peer
        self.ticket = ticket

    def serve(self, first: bytes) -> None:
        self.reader.deadline = self.ticket.auth_deadline
        try:
            data = first + self.reader.read(REQUEST.size - len(first))
            while True:
                request = decode_request(data)
                self.ticket.authenticated()  # a well-formed request on a store without a token
                self._handle(request)
                data = self._next_request()
        except PeerClosed as exc:
            if not exc.clean:
                log.warning("store: LMCache client %s vanished mid-frame", self.peer)
        except MalformedRequest as exc:
            log.warning("store: closing LMCache client %s: %s", self.peer, exc)
        except TimeoutError:
            log.warning(
                "store: dropping LMCache client %s: a request did not cross whole within %g s",
                self.peer,
                self.ctx.frame_timeout,
            )
        except OSError as exc:
            log.warning("store: LMCache client %s failed: %s", self.peer, str(exc))
        except Exception:
            log.exception("store: internal error serving LMCache client %s", self.peer)

    def _next_request(self) -> bytes:
        """Idles as long as the client likes; once a request's first byte is in, the whole
        request (with its value) must be within the frame deadline."""
        if not self.reader.buffered:
            self.reader.deadline = None
            self.reader.wait()
            self.reader.fill(first=True)
        self.reader.deadline = time.monotonic() + self.ctx.frame_timeout
        return self.reader.read(REQUEST.size)

    def _send(self, buffers: Sequence[bytes | memoryview]) -> None:
        send_all(self.sock, buffers, self.ctx.send_deadline())

    def _handle(self, request: Request) -> None:
        if request.command == Command.PUT:
            self._put(request)
        elif request.command == Command.GET:
            self._get(request.key)
        elif request.command == Command.EXIST:
            found = self.index.exists_prefix([request.key], LMCACHE) == 1
            self._send([encode_reply(SUCCESS if found else FAIL)])
        elif request.command == Command.HEALTH:
            self._send([encode_reply(SUCCESS)])
        else:  # LIST: LMCache's server never answers it either, so no client can rely on it
            raise MalformedRequest("LIST is not implemented by LMCache's protocol")

    def _put(self, request: Request) -> None:
        """Stores the value straight into arena pages; visible once every byte is in. A value
        the store cannot take is read and dropped (PUT has no reply to refuse it with), so the
        client's stream stays in step."""
        intake = ValueIntake(self.reader, self.ctx, request.length)
        try:
            self.index.check_sizes([request.length], LMCACHE)
            slot = intake.receive(LMCACHE)
        except (ValueTooLarge, StoreFull) as exc:
            log.warning("store: dropping LMCache put from %s: %s", self.peer, exc)
            self._discard(request.length - intake.received)
            return
        slot.tag = request.tag.pack()  # before commit: no reader sees it untagged
        self.index.commit(slot, request.key, request.length)

    def _get(self, key: bytes) -> None:
        (slot,) = self.index.acquire([key], LMCACHE)
        if slot is None:
            self._send([encode_reply(FAIL)])
            return
        try:
            tag = Tag.of(slot)
            self.arena.populate(slot.extents)
            view = self.arena.view
            payload = [view[offset : offset + size] for offset, size in slot.extents]
            self._send([encode_reply(SUCCESS, slot.length, tag), *payload])
        finally:
            self.index.release([slot])

    def _discard(self, length: int) -> None:
        sink = memoryview(bytearray(min(length, _DISCARD_CHUNK)))
        while length:
            take = min(length, len(sink))
            self.reader.read_into(sink[:take])
            length -= take
