"""The synchronous store clients: `StoreClient` over TCP (`lm://`), `ShmClient` (`shm://`).

They run inside vLLM's worker process, from any thread and without an event loop: each thread
gets its own connection (reused across calls), so calls never wait on one another's transfers.
A connection that went stale (server restarted, idle close) is replaced and the call retried
once; every other failure is a `StoreError` subclass. Every socket operation has a deadline
(`timeout`, 5 s by default): a store that makes no progress for that long is frozen, and the
call fails with `StoreUnavailable` rather than hanging its caller. The shared-memory client
moves bytes by one memcpy each way through the server's arena, and `get_into` reads values in
place (no copy at all); only small control frames cross the socket.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar, cast

import numpy as np

from splitwise_local.store import ops
from splitwise_local.store import protocol as p
from splitwise_local.store.arena import SharedArena
from splitwise_local.store.errors import StoreError, StoreUnavailable, ValueTooLarge
from splitwise_local.store.transport import (
    PeerClosed,
    SocketReader,
    connect_tcp,
    connect_unix,
    recv_exact,
    send_all,
)

T = TypeVar("T")
Value = bytes | bytearray | memoryview
DEFAULT_TIMEOUT = 5.0
MAX_PUT_FRAME = 256 << 20  # bytes of values per PUT frame: within the frame deadline at 10 MB/s


def new_buffer(size: int) -> memoryview:
    """An uninitialised buffer for a value about to be copied in (no zero-filling pass)."""
    return np.empty(size, dtype=np.uint8).data.cast("B")


class Connection:
    """One socket after a successful HELLO; `info` is the server's limits and arena id."""

    def __init__(self, sock: socket.socket, token: str | None) -> None:
        self.sock = sock
        self.reader = SocketReader(sock)
        self.used = False
        self.arena: SharedArena | None = None  # shm:// only: the mapped arena
        self.spare: p.Grant | None = None  # shm:// only: a slot reserved for the next put
        self.info: dict[str, Any] = self.run(ops.hello(token))

    def run(self, flow: ops.Flow[T]) -> T:
        """Drives a flow over the blocking socket."""
        try:
            step = next(flow)
            while True:
                if isinstance(step, ops.Send):
                    send_all(self.sock, step.buffers)
                    step = flow.send(None)
                elif isinstance(step, ops.Recv):
                    step = flow.send(self.reader.read(step.size))
                elif isinstance(step, ops.RecvFds):
                    step = flow.send(self._recv_with_fds(step.size))
                else:
                    self.reader.read_into(step.buffer)
                    step = flow.send(None)
        except StopIteration as done:
            return cast(T, done.value)

    def _recv_with_fds(self, size: int) -> tuple[bytes, list[int]]:
        if self.reader.buffered:  # the descriptor rides on the first byte of the answer
            raise p.FrameError("bytes arrived ahead of a descriptor-passing answer")
        data, fds, _, _ = socket.recv_fds(self.sock, size, 1)
        if not data:
            raise PeerClosed(clean=False)
        return data + recv_exact(self.sock, size - len(data)), fds

    def close(self) -> None:
        self.sock.close()


class StoreClient:
    """A `KVBackend` speaking our protocol over a stream socket, one connection per thread."""

    def __init__(
        self, connect: Callable[[], socket.socket], endpoint: str, token: str | None = None
    ) -> None:
        self.endpoint = endpoint
        self._connect = connect
        self._token = token
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: set[Connection] = set()
        self._pid = os.getpid()
        self._closed = False

    @classmethod
    def tcp(
        cls, host: str, port: int, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> StoreClient:
        return cls(lambda: connect_tcp(host, port, timeout), f"lm://{host}:{port}", token)

    # -- the KVBackend interface -----------------------------------------------------------

    def put(self, key: str | bytes, value: Value) -> None:
        """Returns once the value is visible to every reader on both paths."""
        self.put_many([(key, value)])

    def put_many(self, items: Sequence[tuple[str | bytes, Value]]) -> None:
        if not items:
            return
        prepared = self._prepare(items)
        for batch in ops.batches(prepared, self._max_batch_bytes(), lambda item: len(item[1])):
            self._run(partial(self._put_batch, batch=batch))

    def get(self, key: str | bytes) -> memoryview | None:
        """The value, or None on a miss (a miss is not an error)."""
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str | bytes]) -> list[memoryview | None]:
        values: list[memoryview | None] = []
        for batch in ops.batches([p.key_bytes(k) for k in keys]):
            values.extend(self._run(partial(self._get_batch, keys=batch)))
        return values

    def get_into(
        self, keys: Sequence[str | bytes], use: Callable[[int, memoryview | None], None]
    ) -> None:
        """Batched get that hands each value to `use(index, value)` (None on a miss) in key
        order. The value is only valid during the call: through shared memory it is the
        store's own memory, pinned meanwhile, so nothing is copied."""
        done = 0
        for batch in ops.batches([p.key_bytes(k) for k in keys]):
            for value in self._run(partial(self._get_batch, keys=batch)):
                use(done, value)
                done += 1

    def exists(self, keys: Sequence[str | bytes], touch: bool = True) -> int:
        """How many of `keys`, from the first, are present; `touch=False` leaves their LRU
        order as it is."""
        present = 0
        for batch in ops.batches([p.key_bytes(k) for k in keys]):
            found = self._run_flow(partial(ops.exists, batch, touch))
            present += found
            if found < len(batch):
                break
        return present

    def delete(self, key: str | bytes) -> bool:
        return self._run_flow(partial(ops.delete, [p.key_bytes(key)]))[0]

    def stats(self) -> dict[str, Any]:
        return self._run_flow(ops.stats)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, set()
        for conn in connections:
            conn.close()
        for arena in {id(c.arena): c.arena for c in connections if c.arena}.values():
            with contextlib.suppress(BufferError):  # a caller still holds a view: GC frees it
                arena.close()

    def __enter__(self) -> StoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- per-path data movement (ShmClient overrides these) --------------------------------

    def _put_batch(self, conn: Connection, batch: list[tuple[bytes, memoryview]]) -> None:
        conn.run(ops.put(batch))

    def _get_batch(self, conn: Connection, keys: list[bytes]) -> list[memoryview | None]:
        return conn.run(ops.get(keys, new_buffer))

    def _max_batch_bytes(self) -> int:
        """Values stream straight into the arena one at a time, so a batch needs no room; it
        is split only so each frame crosses well within the server's frame deadline."""
        return MAX_PUT_FRAME

    def _on_connect(self, conn: Connection) -> None:
        """Hook run once per new connection, after HELLO."""

    # -- connections -----------------------------------------------------------------------

    def _prepare(
        self, items: Sequence[tuple[str | bytes, Value]]
    ) -> list[tuple[bytes, memoryview]]:
        """Keys to bytes, values to byte views, and the size limit checked before sending."""
        limit = self._connection().info["max_value"]
        prepared = []
        for key, value in items:
            view = memoryview(value).cast("B")
            if len(view) > limit:
                raise ValueTooLarge(f"value of {len(view)} bytes exceeds the store's {limit}")
            prepared.append((p.key_bytes(key), view))
        return prepared

    def _connection(self) -> Connection:
        if os.getpid() != self._pid:  # forked: the parent's sockets are not ours to use
            self._pid = os.getpid()
            self._local = threading.local()
            self._connections = set()
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreUnavailable(f"{self.endpoint}: client is closed")
        try:
            sock = self._connect()
        except OSError as exc:
            raise StoreUnavailable(f"{self.endpoint}: cannot connect: {exc}") from exc
        try:
            conn = Connection(sock, self._token)
            self._on_connect(conn)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise StoreUnavailable(f"{self.endpoint}: handshake failed: {exc}") from exc
            raise
        with self._lock:
            self._connections.add(conn)
        self._local.conn = conn
        return conn

    def _drop(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        conn.close()

    def _run_flow(self, make: Callable[[], ops.Flow[T]]) -> T:
        """Runs a fresh flow from `make` on this thread's connection (as `_run`)."""
        return self._run(lambda conn: conn.run(make()))

    def _run(self, action: Callable[[Connection], T]) -> T:
        """Runs `action` on this thread's connection; retries once if that one was stale."""
        for attempt in range(2):
            conn = self._connection()
            try:
                result = action(conn)
            except StoreError:
                self._drop(conn)  # the server closes a connection after an error answer
                raise
            except OSError as exc:
                self._drop(conn)
                stale = conn.used and not isinstance(exc, TimeoutError)
                if attempt == 0 and stale:
                    continue
                raise StoreUnavailable(f"{self.endpoint}: {exc}") from exc
            conn.used = True
            return result
        raise AssertionError("unreachable")


class ShmClient(StoreClient):
    """Same-host client: values cross through the server's shared arena, not the socket."""

    def __init__(self, name: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(lambda: connect_unix(name, timeout), f"shm://{name}", token)
        self._arenas: dict[str, SharedArena] = {}

    def _on_connect(self, conn: Connection) -> None:
        """Maps the server's arena, once per server instance (a restarted one has a new id)."""
        arena_id = conn.info["arena_id"]
        with self._lock:
            conn.arena = self._arenas.get(arena_id)
        if conn.arena is None:
            conn.arena = self._attach(conn)
            with self._lock:
                self._arenas = {arena_id: conn.arena}

    @staticmethod
    def _attach(conn: Connection) -> SharedArena:
        info, fds = conn.run(ops.attach())
        return SharedArena.attach(fds[0], info["size"])

    def _max_batch_bytes(self) -> int:
        return max(1, int(self._connection().info["capacity"]) // 4)

    def _put_batch(self, conn: Connection, batch: list[tuple[bytes, memoryview]]) -> None:
        """ALLOC (skipped when the spare fits), one memcpy per value, COMMIT (+ next spare)."""
        arena = conn.arena
        assert arena is not None
        lengths = [len(value) for _, value in batch]
        grants: list[p.Grant | None] = [None] * len(batch)
        spare, conn.spare = conn.spare, None
        if spare is not None and spare.length >= lengths[0]:
            grants[0], spare = spare, None
        missing = [i for i, grant in enumerate(grants) if grant is None]
        if missing:
            stale = [spare.ticket] if spare is not None else []
            fresh = conn.run(ops.alloc([lengths[i] for i in missing], abort=stale))
            for i, grant in zip(missing, fresh, strict=True):
                grants[i] = grant
        done = [grant for grant in grants if grant is not None]
        try:
            for grant, (_, value) in zip(done, batch, strict=True):
                arena.write(grant.extents, value)
        except BaseException:
            conn.run(ops.abort([grant.ticket for grant in done]))
            raise
        items = [(g.ticket, key, len(v)) for g, (key, v) in zip(done, batch, strict=True)]
        conn.spare = conn.run(ops.commit(items, spare=lengths[-1]))

    def get_into(
        self, keys: Sequence[str | bytes], use: Callable[[int, memoryview | None], None]
    ) -> None:
        done = 0
        for batch in ops.batches([p.key_bytes(k) for k in keys]):
            conn, grants = self._run(partial(self._lease, keys=batch))
            arena = conn.arena
            assert arena is not None
            for grant in grants:  # pinned until this connection's next frame
                use(done, self._in_place(arena, grant))
                done += 1

    @staticmethod
    def _lease(conn: Connection, keys: list[bytes]) -> tuple[Connection, list[p.Grant]]:
        return conn, conn.run(ops.lease(keys))

    @staticmethod
    def _in_place(arena: SharedArena, grant: p.Grant) -> memoryview | None:
        """A leased value as a view of the arena, or a copy when it spans several extents."""
        if grant.length < 0:
            return None
        if len(grant.extents) == 1:
            offset, _ = grant.extents[0]
            arena.populate(grant.extents)
            return arena.view[offset : offset + grant.length]
        buffer = new_buffer(grant.length)
        arena.read_into(grant.extents, buffer)
        return buffer

    def _get_batch(self, conn: Connection, keys: list[bytes]) -> list[memoryview | None]:
        arena = conn.arena
        assert arena is not None
        values: list[memoryview | None] = []
        for grant in conn.run(ops.lease(keys)):  # pinned until our next frame
            if grant.length < 0:
                values.append(None)
                continue
            buffer = new_buffer(grant.length)
            arena.read_into(grant.extents, buffer)
            values.append(buffer)
        return values
