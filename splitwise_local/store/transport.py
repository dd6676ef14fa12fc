"""Socket plumbing shared by the server and the clients: addresses, exact reads, gathered sends.

The Unix control socket lives in Linux's abstract namespace (a name, not a file), derived from
the shm name alone, so a client needs nothing but `shm://NAME` and a killed server leaves no
socket file behind.
"""

from __future__ import annotations

import array
import fcntl
import math
import select
import socket
import termios
import time
from collections.abc import Iterable

CONTROL_PREFIX = "splitwise-store/"
_IOV_MAX = 1024  # Linux's limit on buffers per sendmsg


class PeerClosed(ConnectionError):
    """The other side closed the connection; `clean` when it did so between frames."""

    def __init__(self, clean: bool) -> None:
        super().__init__("connection closed by peer" + ("" if clean else " mid-frame"))
        self.clean = clean


class FrameTimeout(TimeoutError):
    """A frame did not cross whole before its deadline."""


def remaining(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (None: no deadline); FrameTimeout once it has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise FrameTimeout("frame deadline passed")
    return left


def wait_for(poll: select.poll, deadline: float | None) -> None:
    """Waits until the socket registered in `poll` is ready, or FrameTimeout at `deadline`."""
    left = remaining(deadline)
    if not poll.poll(None if left is None else math.ceil(left * 1000)):
        raise FrameTimeout("frame deadline passed")


def control_address(name: str) -> str:
    """The abstract Unix socket address of the store serving `shm://name`."""
    if not name or "/" in name or len(name) > 80 or not name.isprintable():
        raise ValueError(f"invalid shm name {name!r}: 1-80 printable characters, no '/'")
    return "\0" + CONTROL_PREFIX + name


def connect_unix(name: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(control_address(name))
    except BaseException:
        sock.close()
        raise
    return sock


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_into_exact(sock: socket.socket, buffer: memoryview, first: bool = False) -> None:
    """Fills `buffer` completely; `first` marks a frame start, where EOF is a clean close."""
    pos, size = 0, len(buffer)
    while pos < size:
        got = sock.recv_into(buffer[pos:])
        if got == 0:
            raise PeerClosed(clean=first and pos == 0)
        pos += got


def recv_exact(sock: socket.socket, size: int, first: bool = False) -> bytearray:
    data = bytearray(size)
    recv_into_exact(sock, memoryview(data), first)
    return data


def send_all(
    sock: socket.socket,
    buffers: Iterable[bytes | bytearray | memoryview],
    deadline: float | None = None,
) -> None:
    """Sends the buffers in order with as few system calls as the kernel allows (no joining).
    On a non-blocking socket (the server's) it waits for room as needed, and all of it must be
    sent by `deadline` (monotonic time), else FrameTimeout."""
    views = [v for v in (memoryview(b).cast("B") for b in buffers) if len(v)]
    i = 0
    writable: select.poll | None = None
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + _IOV_MAX])
        except BlockingIOError:
            if writable is None:
                writable = select.poll()
                writable.register(sock, select.POLLOUT)
            wait_for(writable, deadline)
            continue
        while sent:
            if sent >= len(views[i]):
                sent -= len(views[i])
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


class SocketReader:
    """Reads a socket through a small buffer, so a frame's header and metadata (and any frames
    sent right behind it) cost one system call; payloads larger than what is buffered go
    straight into their destination, so values are never copied an extra time.

    A reader built with `deadlines=True` (the server's) makes its socket non-blocking and waits
    itself, until `deadline` (monotonic time), or without limit while `deadline` is None: so a
    frame must arrive whole in time, however its bytes trickle. Bytes already there cost one
    system call, with no wait (a socket timeout would poll first)."""

    def __init__(self, sock: socket.socket, size: int = 64 * 1024, deadlines: bool = False):
        self.sock = sock
        self._buffer = bytearray(size)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self.deadline: float | None = None
        self._readable: select.poll | None = None
        if deadlines:
            sock.setblocking(False)
            self._readable = select.poll()
            self._readable.register(sock, select.POLLIN)

    def wait(self) -> None:
        """Waits until the socket has something to read (or FrameTimeout at the deadline)."""
        assert self._readable is not None, "only a reader with deadlines waits"
        wait_for(self._readable, self.deadline)

    def _recv_into(self, target: memoryview) -> int:
        while True:
            try:
                return self.sock.recv_into(target)
            except BlockingIOError:
                self.wait()

    @property
    def buffered(self) -> int:
        return self._end - self._start

    def fill(self, first: bool = False) -> None:
        """One receive into the buffer; `first`: EOF with nothing buffered is a clean close."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):  # move the partial frame to the front
            rest = bytes(self._view[self._start : self._end])
            self._view[: len(rest)] = rest
            self._start, self._end = 0, len(rest)
        got = self._recv_into(self._view[self._end :])
        if got == 0:
            raise PeerClosed(clean=first and self._start == self._end)
        self._end += got

    def read(self, size: int, first: bool = False) -> bytes:
        """Exactly `size` bytes. More than the buffer holds are collected as they arrive, so
        memory follows the bytes received, never a length the peer announced."""
        if size > len(self._buffer):
            collected = bytearray()
            while len(collected) < size:
                if not self.buffered:
                    self.fill(first and not collected)
                take = min(size - len(collected), self.buffered)
                collected += self._view[self._start : self._start + take]
                self._start += take
            return bytes(collected)
        while self.buffered < size:
            self.fill(first)
        data = bytes(self._view[self._start : self._start + size])
        self._start += size
        return data

    def read_into(self, target: memoryview) -> None:
        """Fills `target`: first from the buffer, the rest straight from the socket."""
        take = min(len(target), self.buffered)
        target[:take] = self._view[self._start : self._start + take]
        self._start += take
        pos, size = take, len(target)
        while pos < size:
            got = self._recv_into(target[pos:])
            if got == 0:
                raise PeerClosed(clean=False)
            pos += got

    def available(self) -> int:
        """Bytes that can be read now without waiting (at least one: waits for it, within the
        deadline); what a writer has paid for so far."""
        if self.buffered:
            return self.buffered
        if not self._recv_peek():
            raise PeerClosed(clean=False)
        count = array.array("i", [0])
        fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, count)
        return max(1, count[0])

    def _recv_peek(self) -> bool:
        while True:
            try:
                return bool(self.sock.recv(1, socket.MSG_PEEK))
            except BlockingIOError:
                self.wait()
