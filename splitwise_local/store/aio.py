"""The asyncio store client, for callers that live on an event loop (proxy, tools, tests).

It runs the same request flows as the sync client (ops.py) over a small pool of non-blocking
sockets, so concurrent coroutines each get a connection of their own. Bytes travel in the
frames on both schemes: `lm://` over TCP, `shm://NAME` over the same-host Unix socket (the
memcpy path needs descriptor passing and blocking copies, which is the sync client's job).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from splitwise_local.store import ops
from splitwise_local.store import protocol as p
from splitwise_local.store.client import DEFAULT_TIMEOUT, Value, new_buffer
from splitwise_local.store.errors import StoreError, StoreUnavailable, ValueTooLarge
from splitwise_local.store.transport import PeerClosed, control_address

T = TypeVar("T")


class AsyncStoreClient:
    """`await client.put(key, value)`, `get`, `exists`, ...; reuses idle connections."""

    def __init__(self, url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        scheme, _, rest = url.partition("://")
        if scheme == "lm":
            parts = urlsplit(url)
            if not parts.hostname or parts.port is None:
                raise ValueError(f"expected lm://HOST:PORT, got {url!r}")
            self._address: Any = (parts.hostname, parts.port)
            self._family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
        elif scheme == "shm":
            self._address = control_address(rest)
            self._family = socket.AF_UNIX
        else:
            raise ValueError(f"the asyncio client speaks lm:// and shm://, not {url!r}")
        self.url = url
        self._token = token
        self._timeout = timeout
        self._idle: list[tuple[socket.socket, dict[str, Any]]] = []

    async def put(self, key: str | bytes, value: Value) -> None:
        await self.put_many([(key, value)])

    async def put_many(self, items: Sequence[tuple[str | bytes, Value]]) -> None:
        prepared = [(p.key_bytes(k), memoryview(v).cast("B")) for k, v in items]
        for batch in ops.batches(prepared):
            await self._run(partial(ops.put, batch), sizes=[len(v) for _, v in batch])

    async def get(self, key: str | bytes) -> memoryview | None:
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[str | bytes]) -> list[memoryview | None]:
        values: list[memoryview | None] = []
        for batch in ops.batches([p.key_bytes(k) for k in keys]):
            values.extend(await self._run(partial(ops.get, batch, new_buffer)))
        return values

    async def exists(self, keys: Sequence[str | bytes], touch: bool = True) -> int:
        """How many of `keys`, from the first, are present; `touch=False` leaves their LRU
        order as it is."""
        present = 0
        for batch in ops.batches([p.key_bytes(k) for k in keys]):
            found = await self._run(partial(ops.exists, batch, touch))
            present += found
            if found < len(batch):
                break
        return present

    async def delete(self, key: str | bytes) -> bool:
        return (await self._run(partial(ops.delete, [p.key_bytes(key)])))[0]

    async def stats(self) -> dict[str, Any]:
        return await self._run(ops.stats)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for sock, _ in idle:
            sock.close()

    async def __aenter__(self) -> AsyncStoreClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, make_flow: Callable[[], ops.Flow[T]], sizes: Sequence[int] = ()) -> T:
        """Runs a flow on an idle or new connection, returning it to the pool if it is sound;
        an idle connection that went stale is replaced and the flow retried once."""
        for attempt in range(2):
            reused = bool(self._idle)
            sock, info = self._idle.pop() if reused else await self._open()
            if sizes and max(sizes) > info["max_value"]:
                self._idle.append((sock, info))
                raise ValueTooLarge(f"value of {max(sizes)} bytes exceeds {info['max_value']}")
            try:
                result = await asyncio.wait_for(_drive(sock, make_flow()), self._timeout)
            except StoreError:
                sock.close()  # the server closes a connection after an error answer
                raise
            except (TimeoutError, OSError) as exc:
                sock.close()
                if attempt == 0 and reused and isinstance(exc, ConnectionError):
                    continue
                raise StoreUnavailable(f"{self.url}: {exc!r}") from exc
            self._idle.append((sock, info))
            return result
        raise AssertionError("unreachable")

    async def _open(self) -> tuple[socket.socket, dict[str, Any]]:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            loop = asyncio.get_running_loop()
            await asyncio.wait_for(loop.sock_connect(sock, self._address), self._timeout)
            if self._family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            info = await asyncio.wait_for(_drive(sock, ops.hello(self._token)), self._timeout)
        except (TimeoutError, OSError) as exc:
            sock.close()
            raise StoreUnavailable(f"{self.url}: cannot connect: {exc!r}") from exc
        except BaseException:
            sock.close()
            raise
        return sock, info


async def _drive(sock: socket.socket, flow: ops.Flow[T]) -> T:
    """Runs a flow on a non-blocking socket through the event loop."""
    loop = asyncio.get_running_loop()
    try:
        step = next(flow)
        while True:
            if isinstance(step, ops.Send):
                for buffer in step.buffers:
                    await loop.sock_sendall(sock, buffer)
                step = flow.send(None)
            elif isinstance(step, ops.Recv):
                data = bytearray(step.size)
                await _recv_into(loop, sock, memoryview(data))
                step = flow.send(data)
            elif isinstance(step, ops.RecvInto):
                await _recv_into(loop, sock, step.buffer)
                step = flow.send(None)
            else:
                raise TypeError(f"the asyncio client cannot do {type(step).__name__}")
    except StopIteration as done:
        return cast(T, done.value)


async def _recv_into(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview
) -> None:
    pos = 0
    while pos < len(view):
        got = await loop.sock_recv_into(sock, view[pos:])
        if got == 0:
            raise PeerClosed(clean=False)
        pos += got
