"""Talking to engines: one pooled aiohttp session, engine choice, and what a failure means.

aiohttp rather than httpx: measured here on 2 cores, httpx spent about 0.6 ms of CPU per
request alone and 2.4 ms at 32 concurrent (its connection pool scans every connection per
request), against aiohttp's 0.12 ms, and the proxy makes two upstream requests per call.

Only a request that never reached an engine (connection refused or timed out) moves on to the
next engine of the pool; anything after that would risk running a generation twice. Every
answer being read is tracked per engine, so when an engine is known to have died its answers
are closed at once: their readers fail now (a stream ends with an error event) instead of
waiting for a socket timeout from an engine that may be frozen rather than gone.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
from starlette.responses import JSONResponse

from splitwise_local.proxy.errors import error_response
from splitwise_local.proxy.pool import Endpoint, EnginePool, Rank

UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)
FAILURE_STATUS = {"unreachable": 503, "timeout": 504, "transport": 502, "died": 502}
# Keep-alive connections are dropped before uvicorn's (vLLM's server) 5 s idle timeout closes
# them, so a request never lands on a connection the engine is closing.
KEEPALIVE_S = 4.0


class UpstreamFailure(Exception):
    """No answer from an engine of `role`; `kind` (unreachable, timeout, transport, died) says
    why. The message names the engine, for logs and operators; `public` says the same without
    its address, for callers."""

    def __init__(self, role: str, kind: str, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.role = role
        self.kind = kind
        self.public = public or message

    @property
    def metric_kind(self) -> str:
        """`prefill_timeout`, `decode_unreachable`, ...: the errors counter's label and the
        answer's `code`."""
        return f"{self.role}_{self.kind}"

    def response(self, retry_after_s: int | None = None, detail: bool = False) -> JSONResponse:
        """The caller's error (the engine's address only with `detail`); a 503 (no engine to
        send to) says when to try again."""
        status = FAILURE_STATUS.get(self.kind, 502)
        headers = {"retry-after": str(retry_after_s)} if status == 503 and retry_after_s else None
        message = str(self) if detail else self.public
        return error_response(status, message, code=self.metric_kind, headers=headers)


def failure_kind(exc: BaseException) -> str:
    """How a request to an engine failed: it never connected, it stopped sending in time, or
    the transport broke otherwise."""
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return "unreachable"
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    return "transport"


def timeout(connect_s: float, read_s: float) -> aiohttp.ClientTimeout:
    """No total limit (generations run long); `read_s` bounds each wait for more bytes.

    Only opening a socket is bounded by `connect_s`, not waiting for a pooled connection: a
    busy proxy queues, and a connect timeout always means the engine did not answer.
    """
    return aiohttp.ClientTimeout(total=None, sock_connect=connect_s, sock_read=read_s)


def open_session(max_connections: int) -> aiohttp.ClientSession:
    """The shared session. Engines' bytes are relayed raw, so they must arrive uncompressed;
    it keeps no cookies, which would otherwise leak from one caller's answer into the next."""
    connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        headers={"accept-encoding": "identity"},
        timeout=aiohttp.ClientTimeout(total=None),
    )


class Upstream:
    """Sends requests to a pool's engines, marking engines down when they fail."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self._open: dict[Endpoint, set[aiohttp.ClientResponse]] = collections.defaultdict(set)

    async def send(
        self,
        pool: EnginePool,
        method: str,
        path: str,
        headers: dict[str, str],
        limits: aiohttp.ClientTimeout,
        data: bytes | None = None,
        rank: Rank | None = None,
        tokens: int = 0,
    ) -> tuple[Endpoint, aiohttp.ClientResponse]:
        """Sends to the engine that ranks lowest (default: least loaded) and returns once the
        answer's headers are in.

        The endpoint stays counted in flight until the caller releases it, and `tokens` stay
        pending on it until the caller says they are computed (`pool.computed`).
        """
        tried: list[Endpoint] = []
        while (endpoint := pool.acquire(tried, rank, tokens)) is not None:
            tried.append(endpoint)
            try:
                response = await self.session.request(
                    method, endpoint.url + path, data=data, headers=headers, timeout=limits
                )
            except UPSTREAM_ERRORS as exc:
                pool.release(endpoint)
                pool.computed(endpoint, tokens)
                failure = self.failed(pool, endpoint, exc)
                if failure.kind == "unreachable":
                    continue
                raise failure from exc
            except BaseException:  # cancelled: the caller left
                pool.release(endpoint)
                pool.computed(endpoint, tokens)
                raise
            pool.mark_up(endpoint)
            self._open[endpoint].add(response)
            return endpoint, response
        public = f"every {pool.role} engine is marked down after failing; retrying later"
        message = public
        if tried:
            public = f"no {pool.role} engine reachable"
            message = f"{public} (tried {', '.join(e.url for e in tried)})"
        raise UpstreamFailure(pool.role, "unreachable", message, public)

    async def read(
        self, pool: EnginePool, endpoint: Endpoint, response: aiohttp.ClientResponse
    ) -> bytes:
        """The whole answer; releases the connection (closed if unfinished) and the endpoint.

        An engine that answers 5xx is marked down like one that cannot be reached: it may be
        dying (vLLM answers 500 to every request for seconds after its engine core died), and
        the next requests are better sent elsewhere. The answer itself is still the caller's.
        """
        try:
            body = await response.read()
        except UPSTREAM_ERRORS as exc:
            raise self.failed(pool, endpoint, exc) from exc
        finally:
            self.finish(pool, endpoint, response)
        if response.status >= 500:
            pool.mark_down(endpoint, f"answered {response.status}")
        return body

    async def first_event(
        self, pool: EnginePool, endpoint: Endpoint, response: aiohttp.ClientResponse
    ) -> bytes:
        """A stream's bytes up to the end of its first event (or its end, if sooner): enough to
        tell a refusal from an answer before the caller is sent a status. If that fails, or the
        caller leaves meanwhile, the answer is finished as `read` would."""
        head = b""
        try:
            while b"\n\n" not in head and (chunk := await response.content.readany()):
                head += chunk
        except UPSTREAM_ERRORS as exc:
            failure = self.failed(pool, endpoint, exc)
            self.finish(pool, endpoint, response)
            raise failure from exc
        except BaseException:
            self.finish(pool, endpoint, response)
            raise
        return head

    def finish(
        self, pool: EnginePool, endpoint: Endpoint, response: aiohttp.ClientResponse
    ) -> None:
        """Done with an answer: its connection is released (closed if the answer is unfinished,
        so the engine sees the disconnect and aborts the generation) and the endpoint too."""
        response.release()
        self._open[endpoint].discard(response)
        pool.release(endpoint)

    def abort(self, endpoint: Endpoint) -> int:
        """Closes every answer still being read from `endpoint`; returns how many."""
        answers = list(self._open.pop(endpoint, ()))
        for response in answers:
            response.close()
        return len(answers)

    def failed(self, pool: EnginePool, endpoint: Endpoint, exc: BaseException) -> UpstreamFailure:
        """Marks the engine down and names the failure (its death, when that is known)."""
        kind = failure_kind(exc)
        if endpoint.dead is not None:  # never reached it: still worth trying another
            message = f"{pool.role} engine {endpoint.url} died: {endpoint.dead}"
            public = f"{pool.role} engine died: {endpoint.dead}"
            kind = kind if kind == "unreachable" else "died"
            return UpstreamFailure(pool.role, kind, message, public)
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        pool.mark_down(endpoint, reason)
        message = f"{pool.role} engine {endpoint.url}: {reason}"
        public = f"{pool.role} engine failed: {type(exc).__name__}"  # exc may name the address
        return UpstreamFailure(pool.role, kind, message, public)
