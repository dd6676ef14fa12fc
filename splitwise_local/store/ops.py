"""Each client operation as a sans-I/O flow: what to send, what to read, what it means.

A flow is a generator that yields I/O steps (`Send`, `Recv`, `RecvInto`, `RecvFds`) and
returns the operation's result, so the sync client (blocking sockets) and the asyncio client
(event loop) run the very same request logic through their own small drivers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple, TypeVar

from splitwise_local.store import protocol as p

T = TypeVar("T")
Buffer = bytes | bytearray | memoryview


class Send(NamedTuple):
    buffers: Sequence[Buffer]


class Recv(NamedTuple):
    size: int  # the driver answers with that many bytes


class RecvInto(NamedTuple):
    buffer: memoryview  # the driver fills it completely


class RecvFds(NamedTuple):
    size: int  # the driver answers with (that many bytes, file descriptors passed with them)


Step = Send | Recv | RecvInto | RecvFds
BATCH_ITEMS = 4096  # keys per frame: 4096 x (2 + 512 + 8) bytes stays under MAX_META
Flow = Generator[Step, Any, T]


def call(
    op: p.Op, count: int = 0, meta: bytes = b"", payload: Sequence[Buffer] = (), flags: int = 0
) -> Flow[tuple[p.Header, bytes]]:
    """Sends one request and returns its (header, metadata); an error status raises."""
    yield Send([p.frame(op, count, meta, flags), *payload])
    return (yield from response())


def response(head: bytes | None = None) -> Flow[tuple[p.Header, bytes]]:
    """Reads one response (its header bytes may already be in hand) and raises on errors."""
    header = p.decode_header(head if head is not None else (yield Recv(p.HEADER.size)))
    meta = bytes((yield Recv(header.meta_len))) if header.meta_len else b""
    if header.code != p.Status.OK:
        raise p.error_for(header.code, meta.decode(errors="replace"))
    return header, meta


def hello(token: str | None) -> Flow[dict[str, Any]]:
    _, meta = yield from call(p.Op.HELLO, 0, p.encode_json({"token": token}) if token else b"")
    return p.decode_json(meta)


def put(items: Sequence[tuple[bytes, memoryview]]) -> Flow[None]:
    meta = p.encode_sized_keys([(key, len(value)) for key, value in items])
    yield from call(p.Op.PUT, len(items), meta, [value for _, value in items])


def get(
    keys: Sequence[bytes], allocate: Callable[[int], memoryview]
) -> Flow[list[memoryview | None]]:
    """Values in key order (None for a miss), each received into `allocate(length)`."""
    _, meta = yield from call(p.Op.GET, len(keys), p.encode_keys(keys))
    values: list[memoryview | None] = []
    for length in p.decode_lengths(meta, len(keys)):
        if length < 0:
            values.append(None)
            continue
        buffer = allocate(length)
        if length:
            yield RecvInto(buffer)
        values.append(buffer)
    return values


def exists(keys: Sequence[bytes], touch: bool = True) -> Flow[int]:
    flags = 0 if touch else p.Flag.NO_TOUCH
    header, _ = yield from call(p.Op.EXISTS, len(keys), p.encode_keys(keys), flags=flags)
    return header.count


def delete(keys: Sequence[bytes]) -> Flow[list[bool]]:
    _, meta = yield from call(p.Op.DELETE, len(keys), p.encode_keys(keys))
    return [bool(flag) for flag in meta]


def stats() -> Flow[dict[str, Any]]:
    _, meta = yield from call(p.Op.STATS)
    return p.decode_json(meta)


def attach() -> Flow[tuple[dict[str, Any], list[int]]]:
    """ATTACH: the arena's size and id, and its file descriptor riding on the response."""
    yield Send([p.frame(p.Op.ATTACH)])
    head, fds = yield RecvFds(p.HEADER.size)
    try:
        _, meta = yield from response(head)
        info = p.decode_json(meta)
        if len(fds) != 1:
            raise p.FrameError(f"ATTACH answer carried {len(fds)} descriptors, expected 1")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return info, fds


def alloc(lengths: Sequence[int], abort: Sequence[int] = ()) -> Flow[list[p.Grant]]:
    """Pending slots of these sizes; `abort` tickets are given back in the same round trip."""
    frames = [p.frame(p.Op.ABORT, len(abort), p.encode_u64s(abort))] if abort else []
    frames.append(p.frame(p.Op.ALLOC, len(lengths), p.encode_u64s(lengths)))
    yield Send(frames)
    if abort:
        yield from response()
    _, meta = yield from response()
    return p.decode_grants(meta, len(lengths))


def commit(items: Sequence[tuple[int, bytes, int]], spare: int = 0) -> Flow[p.Grant | None]:
    """Makes (ticket, key, length) values visible. With `spare`, the same round trip first
    reserves a slot of that size for the next put (best effort: None if there is no room),
    so a steady stream of shared-memory puts costs one round trip each, not two. The spare
    comes first so that the room it makes is never taken from the values being committed."""
    frames = [p.frame(p.Op.ALLOC, 1, p.encode_u64s([spare]), p.Flag.BEST_EFFORT)] if spare else []
    frames.append(p.frame(p.Op.COMMIT, len(items), p.encode_commits(items)))
    yield Send(frames)
    grant = None
    if spare:
        _, meta = yield from response()
        (grant,) = p.decode_grants(meta, 1)
    yield from response()
    return grant if grant is not None and grant.length >= 0 else None


def abort(tickets: Sequence[int]) -> Flow[None]:
    yield from call(p.Op.ABORT, len(tickets), p.encode_u64s(tickets))


def lease(keys: Sequence[bytes]) -> Flow[list[p.Grant]]:
    """Where the values are; they stay pinned until this connection's next frame."""
    _, meta = yield from call(p.Op.LEASE, len(keys), p.encode_keys(keys))
    return p.decode_grants(meta, len(keys))


def batches(
    items: Sequence[T], max_bytes: int = 0, size: Callable[[T], int] | None = None
) -> list[list[T]]:
    """Splits a batch to fit the frame limits and, for writes, `max_bytes` of values, each
    value's bytes counted by `size`."""
    out: list[list[T]] = []
    current: list[T] = []
    total = 0
    for item in items:
        n = size(item) if max_bytes and size is not None else 0
        if current and (len(current) >= BATCH_ITEMS or (max_bytes and total + n > max_bytes)):
            out.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        out.append(current)
    return out
