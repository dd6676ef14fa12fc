"""What one peer may cost the store: connection caps, and refusals that cost nothing to send.

Every accepted connection takes a `Pass` from `Admission`, or is refused at once (one BUSY
error frame, then closed) when the store already holds `max_connections`, or
`max_unauthenticated` connections that have not yet proved they hold the token. A pass is
unauthenticated until its first frame succeeds (HELLO with the token; for LMCache's protocol,
which carries no token, its first well-formed request on a store without one), and that
first frame must arrive by `auth_deadline`; so strangers can hold at most
`max_unauthenticated` threads, each for at most one frame deadline, and never crowd out the
engines' authenticated connections beyond the total cap.

Refused sockets linger, without a thread, in the acceptor's `Lingering` set: the refusal is
sent, the sending side shut, and what the client still sends is read and dropped until it
closes or `DRAIN_SECONDS` pass (closing with unread bytes would reset the connection and
could destroy the refusal before the client reads it).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

DRAIN_SECONDS = 2.0  # after a refusal, how long to swallow what the client is still sending
MAX_LINGERING = 64  # refused sockets drained at once; beyond that they are closed at once
_SINK = memoryview(bytearray(64 * 1024))  # only the acceptor thread reads into it


@dataclass
class Pass:
    """One admitted connection's place in the counts."""

    admission: Admission
    auth_deadline: float  # monotonic time by which its first frame must be in
    _authenticated: bool = False
    _closed: bool = False

    def authenticated(self) -> None:
        """It proved itself: it no longer counts against the unauthenticated cap."""
        with self.admission.lock:
            if not self._authenticated and not self._closed:
                self._authenticated = True
                self.admission.unauthenticated -= 1

    def close(self) -> None:
        with self.admission.lock:
            if self._closed:
                return
            self._closed = True
            self.admission.open -= 1
            if not self._authenticated:
                self.admission.unauthenticated -= 1


@dataclass
class Admission:
    """The connection caps; thread-safe."""

    max_connections: int
    max_unauthenticated: int
    frame_timeout: float
    open: int = 0
    unauthenticated: int = 0
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.max_connections < 1 or not 1 <= self.max_unauthenticated <= self.max_connections:
            raise ValueError(
                "need 1 <= max_unauthenticated <= max_connections, got "
                f"{self.max_unauthenticated} and {self.max_connections}"
            )

    def admit(self) -> Pass | str:
        """A pass for a new connection, or why it is refused."""
        with self.lock:
            if self.open >= self.max_connections:
                reason = f"too many connections ({self.max_connections}); try again later"
            elif self.unauthenticated >= self.max_unauthenticated:
                reason = (
                    f"too many connections still to authenticate ({self.max_unauthenticated}); "
                    "try again later"
                )
            else:
                self.open += 1
                self.unauthenticated += 1
                return Pass(self, time.monotonic() + self.frame_timeout)
            self.refused += 1
            return reason


class Lingering:
    """Refused sockets being drained by the acceptor's selector until they close."""

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector
        self._deadlines: dict[socket.socket, float] = {}

    def add(self, sock: socket.socket, refusal: bytes) -> None:
        """Sends `refusal` without waiting (it fits an empty socket buffer), then drains."""
        try:
            sock.setblocking(False)
            sock.send(refusal)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self._deadlines) >= MAX_LINGERING:
            oldest = min(self._deadlines, key=self._deadlines.__getitem__)
            self._close(oldest)
        self._deadlines[sock] = time.monotonic() + DRAIN_SECONDS
        self._selector.register(sock, selectors.EVENT_READ, self)

    def drain(self, sock: socket.socket) -> None:
        """Reads what arrived; closes the socket at its end."""
        try:
            while sock.recv_into(_SINK):
                pass
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(sock)

    def timeout(self) -> float | None:
        """Seconds until the next drain deadline (None: nothing lingers); closes the late."""
        now = time.monotonic()
        for sock, deadline in list(self._deadlines.items()):
            if deadline <= now:
                self._close(sock)
        return max(0.0, min(self._deadlines.values()) - now) if self._deadlines else None

    def close_all(self) -> None:
        for sock in list(self._deadlines):
            self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        del self._deadlines[sock]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        sock.close()
