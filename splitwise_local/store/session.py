"""One client connection on the server: reads frames, runs them against the index, answers.

Bytes never pass through Python objects: a put is received straight into the value's arena
pages, a get is sent straight from them. Whatever goes wrong on one connection (a malformed
frame, an absurd length, a client that vanishes mid-transfer) ends that connection only: its
unfinished writes are aborted unseen, its pins released, and one line is logged.

What a connection may cost is bounded before trust and by what it sends after: the first
frame must be HELLO with at most MAX_HELLO_META bytes of metadata, checked before anything
else is read; every frame, request or answer, must cross whole within the frame deadline; and
a value's pages are reserved as its bytes arrive (`ValueIntake`), so a put that announces a
large value and sends it slowly, or not at all, evicts only what it has already sent.
"""

from __future__ import annotations

import hmac
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from splitwise_local.store import protocol as p
from splitwise_local.store.arena import SharedArena
from splitwise_local.store.errors import AuthError, StoreError, StoreFull, ValueTooLarge
from splitwise_local.store.index import OURS, Slot, StoreIndex
from splitwise_local.store.limits import DRAIN_SECONDS, Pass
from splitwise_local.store.transport import PeerClosed, SocketReader, send_all

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionContext:
    """What every session shares: the store and the server's settings."""

    index: StoreIndex
    arena: SharedArena
    arena_id: str
    auth_token: str | None
    frame_timeout: float
    server_stats: Callable[[], dict[str, Any]]

    def send_deadline(self) -> float:
        """When an answer starting now must be sent by."""
        return time.monotonic() + self.frame_timeout


class ValueIntake:
    """Receives one value of `length` bytes straight into arena pages that are reserved as
    its bytes arrive: each step takes pages for what the socket already holds (rounded up to
    a page), so eviction never runs ahead of the writer by more than a page. `received`
    says how far it got, should it fail."""

    def __init__(self, reader: SocketReader, ctx: SessionContext, length: int) -> None:
        self.reader = reader
        self.ctx = ctx
        self.length = length
        self.received = 0

    def receive(self, protocol: str = OURS) -> Slot:
        """The filled pending slot (commit or abort it); aborted here if anything fails."""
        index, arena = self.ctx.index, self.ctx.arena
        slot = index.open(protocol)
        try:
            if not self.length:
                index.grow(slot, 0)  # an empty value still takes a page
            while self.received < self.length:
                paid = min(self.length - self.received, self.reader.available())
                for offset, size in index.grow(slot, paid):
                    take = min(size, self.length - self.received)
                    arena.populate([(offset, take)])
                    self.reader.read_into(arena.view[offset : offset + take])
                    self.received += take
        except BaseException:
            index.abort(slot)
            raise
        return slot


def _status_of(exc: Exception) -> p.Status:
    if isinstance(exc, p.FrameError):
        return exc.status
    kinds: dict[type, p.Status] = {
        AuthError: p.Status.AUTH_FAILED,
        ValueTooLarge: p.Status.VALUE_TOO_LARGE,
        StoreFull: p.Status.STORE_FULL,
    }
    return kinds.get(type(exc), p.Status.INTERNAL)


class Session:
    """Serves our protocol on one accepted socket until the client leaves or errs."""

    def __init__(
        self, sock: socket.socket, ctx: SessionContext, peer: str, unix: bool, ticket: Pass
    ) -> None:
        self.sock = sock
        self.reader = SocketReader(sock, deadlines=True)
        self.ctx = ctx
        self.peer = peer
        self.unix = unix
        self.ticket = ticket
        self._greeted = False
        self._last_ticket = 0
        self._pending: dict[int, Slot] = {}  # ALLOC'd, not yet COMMIT'ed, by ticket
        self._leased: list[Slot] = []  # pinned by the last LEASE, until the next frame
        self._held: list[bytes] = []  # answers waiting to leave with the next one
        self._handlers: dict[int, Callable[[p.Header, memoryview], None]] = {
            p.Op.HELLO: self._hello,
            p.Op.PUT: self._put,
            p.Op.GET: self._get,
            p.Op.EXISTS: self._exists,
            p.Op.DELETE: self._delete,
            p.Op.STATS: self._stats,
            p.Op.ATTACH: self._attach,
            p.Op.ALLOC: self._alloc,
            p.Op.COMMIT: self._commit,
            p.Op.ABORT: self._abort,
            p.Op.LEASE: self._lease,
        }

    def serve(self, first: bytes) -> None:
        """Runs until the connection ends; `first` is the magic the dispatcher already read.
        The first frame is due by the pass's deadline, counted from the connection's accept."""
        self.reader.deadline = self.ticket.auth_deadline
        try:
            header = first + self.reader.read(p.HEADER.size - len(first))
            while True:
                self._end_lease()
                self._handle(p.decode_header(header))
                header = self._next_header()
        except PeerClosed as exc:
            if not exc.clean:
                log.warning(
                    "store: %s vanished mid-frame; its partial writes are dropped", self.peer
                )
        except (StoreError, ValueError) as exc:
            self._refuse(exc)
        except TimeoutError:
            log.warning(
                "store: dropping connection from %s: a frame did not cross whole within %g s",
                self.peer,
                self.ctx.frame_timeout,
            )
        except OSError as exc:  # logged as text: a kept exception would pin arena views
            log.warning("store: connection from %s failed: %s", self.peer, str(exc))
        except Exception as exc:
            log.exception("store: internal error serving %s", self.peer)
            self._refuse(exc)
        finally:
            self._cleanup()

    def _next_header(self) -> bytes:
        """Waits for the next frame as long as the client likes; once its first byte is in,
        the whole frame must be within the frame deadline."""
        if not self.reader.buffered:
            self.reader.deadline = None
            self.reader.wait()
            self.reader.fill(first=True)
        self.reader.deadline = time.monotonic() + self.ctx.frame_timeout
        return self.reader.read(p.HEADER.size)

    def _end_lease(self) -> None:
        """A client sends its next frame only after copying what it leased: unpin that."""
        if self._leased:
            self.ctx.index.release(self._leased)
            self._leased = []

    def _handle(self, header: p.Header) -> None:
        handler = self._handlers.get(header.code)
        if handler is None:
            raise p.FrameError(f"unknown opcode {header.code}")
        if not self._greeted and header.code != p.Op.HELLO:
            raise p.FrameError("the first frame must be HELLO", p.Status.BAD_REQUEST)
        if header.code == p.Op.HELLO and header.meta_len > p.MAX_HELLO_META:
            raise p.FrameError(
                f"HELLO metadata of {header.meta_len} bytes exceeds {p.MAX_HELLO_META}"
            )
        if header.code in p.SHM_OPS and not self.unix:
            raise p.FrameError("shared-memory opcodes need the Unix socket", p.Status.BAD_REQUEST)
        handler(header, memoryview(self.reader.read(header.meta_len)))

    def _reply(self, count: int = 0, meta: bytes = b"", *payload: memoryview) -> None:
        """Sends an answer, or holds it while the client's next frame is already here, so the
        answers to frames sent together (COMMIT with the next ALLOC) leave in one send and
        wake the client once. Answers carrying values are sent at once: their pins end when
        the handler returns."""
        answer = p.frame(p.Status.OK, count, meta)
        if not payload and self.reader.buffered >= p.HEADER.size:
            self._held.append(answer)
            return
        send_all(self.sock, [*self._held, answer, *payload], self.ctx.send_deadline())
        self._held.clear()

    def _refuse(self, exc: Exception) -> None:
        """Answers the error, then swallows what the client still sends so it reads the answer."""
        status = _status_of(exc)
        log.warning("store: closing connection from %s: %s: %s", self.peer, status.name, str(exc))
        try:
            self.sock.settimeout(DRAIN_SECONDS)
            send_all(self.sock, [*self._held, p.frame(status, 0, str(exc).encode())])
            self.sock.shutdown(socket.SHUT_WR)
            sink = memoryview(bytearray(64 * 1024))
            deadline = time.monotonic() + DRAIN_SECONDS
            while time.monotonic() < deadline and self.sock.recv_into(sink):
                pass
        except OSError:
            pass

    def _cleanup(self) -> None:
        for slot in self._pending.values():
            self.ctx.index.abort(slot)
        self._pending.clear()
        self._end_lease()

    # -- operations on any connection ------------------------------------------------------

    def _hello(self, header: p.Header, meta: memoryview) -> None:
        token = p.decode_json(meta).get("token") if len(meta) else None
        expected = self.ctx.auth_token
        if expected and not (
            isinstance(token, str) and hmac.compare_digest(token.encode(), expected.encode())
        ):
            raise AuthError("missing or wrong auth token")
        self._greeted = True
        self.ticket.authenticated()
        index = self.ctx.index
        self._reply(
            0,
            p.encode_json(
                {
                    "version": p.VERSION,
                    "capacity": index.capacity,
                    "max_value": index.max_value,
                    "max_key": p.MAX_KEY,
                    "max_count": p.MAX_COUNT,
                    "arena_id": self.ctx.arena_id,
                }
            ),
        )

    def _put(self, header: p.Header, meta: memoryview) -> None:
        items = p.decode_sized_keys(meta, header.count)
        self._check_sizes([length for _, length in items])
        for key, length in items:
            slot = ValueIntake(self.reader, self.ctx, length).receive()
            self.ctx.index.commit(slot, key, length)
        self._reply(header.count)

    def _get(self, header: p.Header, meta: memoryview) -> None:
        slots = self.ctx.index.acquire(p.decode_keys(meta, header.count))
        try:
            view = self.ctx.arena.view
            for slot in slots:
                if slot is not None:
                    self.ctx.arena.populate(slot.extents)
            lengths = [-1 if slot is None else slot.length for slot in slots]
            payload = [
                view[offset : offset + size]
                for slot in slots
                if slot is not None
                for offset, size in slot.extents
            ]
            self._reply(header.count, p.encode_lengths(lengths), *payload)
        finally:
            self.ctx.index.release([slot for slot in slots if slot is not None])

    def _exists(self, header: p.Header, meta: memoryview) -> None:
        touch = not header.flags & p.Flag.NO_TOUCH
        self._reply(self.ctx.index.exists_prefix(p.decode_keys(meta, header.count), touch=touch))

    def _delete(self, header: p.Header, meta: memoryview) -> None:
        flags = bytes(self.ctx.index.delete(key) for key in p.decode_keys(meta, header.count))
        self._reply(header.count, flags)

    def _stats(self, header: p.Header, meta: memoryview) -> None:
        self._reply(0, p.encode_json({**self.ctx.index.stats(), **self.ctx.server_stats()}))

    # -- shared-memory operations (Unix socket only) ----------------------------------------

    def _attach(self, header: p.Header, meta: memoryview) -> None:
        arena = self.ctx.arena
        info = {"size": arena.size, "arena_id": self.ctx.arena_id}
        self.sock.settimeout(self.ctx.frame_timeout)  # once per connection: blocking is fine
        socket.send_fds(self.sock, [p.frame(p.Status.OK, 0, p.encode_json(info))], [arena.fd])
        self.sock.setblocking(False)  # back to the reader's own waits

    def _alloc(self, header: p.Header, meta: memoryview) -> None:
        """Pending slots for the client to fill; best effort answers -1 where none fits."""
        lengths = p.decode_u64s(meta, header.count)
        best_effort = bool(header.flags & p.Flag.BEST_EFFORT)
        if not best_effort:
            self._check_sizes(lengths)
        grants = []
        for length in lengths:
            try:
                slot = self.ctx.index.reserve(length)
            except (StoreFull, ValueTooLarge):
                if not best_effort:
                    raise  # the session's cleanup aborts what this batch reserved so far
                grants.append(p.Grant(-1, 0, []))
                continue
            self._last_ticket += 1
            self._pending[self._last_ticket] = slot
            grants.append(p.Grant(slot.length, self._last_ticket, slot.extents))
        self._reply(header.count, p.encode_grants(grants))

    def _commit(self, header: p.Header, meta: memoryview) -> None:
        items = p.decode_commits(meta, header.count)
        slots = self._take([ticket for ticket, _, _ in items])
        for slot, (_, key, length) in zip(slots, items, strict=True):
            if length > slot.length:
                raise p.FrameError(
                    f"commit of {length} bytes into {slot.length}", p.Status.BAD_REQUEST
                )
            self.ctx.index.commit(slot, key, length)
        self._reply(header.count)

    def _abort(self, header: p.Header, meta: memoryview) -> None:
        for slot in self._take(p.decode_u64s(meta, header.count)):
            self.ctx.index.abort(slot)
        self._reply(header.count)

    def _lease(self, header: p.Header, meta: memoryview) -> None:
        """Pins values where they are; the pins end when the client's next frame arrives."""
        grants = []
        for slot in self.ctx.index.acquire(p.decode_keys(meta, header.count)):
            if slot is None:
                grants.append(p.Grant(-1, 0, []))
            else:
                self._leased.append(slot)
                grants.append(p.Grant(slot.length, 0, slot.extents))
        self._reply(header.count, p.encode_grants(grants))

    # -- helpers ---------------------------------------------------------------------------

    def _check_sizes(self, lengths: list[int]) -> None:
        """Refuses a batch with any oversized value before a single byte is stored."""
        self.ctx.index.check_sizes(lengths)

    def _take(self, tickets: list[int]) -> list[Slot]:
        unknown = [t for t in tickets if t not in self._pending]
        if unknown or len(set(tickets)) != len(tickets):
            raise p.FrameError(f"unknown or repeated tickets {tickets[:4]}", p.Status.BAD_REQUEST)
        return [self._pending.pop(t) for t in tickets]
