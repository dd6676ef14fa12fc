"""Throughput helpers the store benchmarks share: a raw-socket baseline and GB/s timing.

The baseline moves the same bytes over loopback as a store client would (length prefix, one-byte
acknowledgement, buffers allocated once), in a process of its own like the store: the ceiling a
TCP store can reach on this machine.
"""

from __future__ import annotations

import multiprocessing
import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

MiB = 1024 * 1024
SIZES = (1 * MiB, 16 * MiB)
BATCH_LARGE = 8  # values per put_many / get_many in the batched throughput rows
_REQUEST = struct.Struct("<cQ")  # baseline: b"P" or b"G", then the byte count


def largest_case_bytes(mb: int) -> int:
    """Bytes one size's values take in a `--mb MB` run: `mb` MiB, and never fewer than four
    values of the largest size (each measurement moves at least four)."""
    return max(mb * MiB, 4 * max(SIZES))


def _socket_baseline_server(listener: socket.socket) -> None:
    """The raw-socket baseline: receives into and sends from buffers allocated once."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = memoryview(bytearray(max(SIZES)))
    with conn:
        while head := _recv_exact(conn, memoryview(bytearray(_REQUEST.size))):
            op, size = _REQUEST.unpack(head)
            if op == b"P":
                _recv_exact(conn, buffer[:size])
                conn.sendall(b"k")
            else:
                conn.sendall(buffer[:size])


def _recv_exact(conn: socket.socket, view: memoryview) -> memoryview | None:
    pos = 0
    while pos < len(view):
        got = conn.recv_into(view[pos:])
        if not got:
            return None
        pos += got
    return view


class SocketBaseline:
    """A client of `_socket_baseline_server`, running in a process of its own like the store."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=_socket_baseline_server, args=(listener,))
        self.process.start()
        self.sock = socket.create_connection(listener.getsockname())
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        listener.close()
        self.buffer = memoryview(bytearray(max(SIZES)))

    def put(self, value: memoryview) -> None:
        self.sock.sendmsg([_REQUEST.pack(b"P", len(value))])
        self.sock.sendall(value)
        _recv_exact(self.sock, self.buffer[:1])

    def get(self, size: int) -> None:
        self.sock.sendall(_REQUEST.pack(b"G", size))
        _recv_exact(self.sock, self.buffer[:size])

    def close(self) -> None:
        self.sock.close()
        self.process.join(timeout=10)


def each(items: Sequence[str], call: Callable[[str], Any]) -> Callable[[], None]:
    """An action that makes one call per item (one value moved per call)."""

    def action() -> None:
        for item in items:
            call(item)

    return action


def gbps(action: Callable[[], None], total_bytes: int) -> float:
    start = time.perf_counter()
    action()
    return total_bytes / (time.perf_counter() - start) / 1e9


def best(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {name: max(r[name] for r in rounds) for name in rounds[0]}
