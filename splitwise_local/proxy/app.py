"""The Starlette app: one OpenAI-compatible endpoint in front of prefill and decode engines.

A completion request walks: check the API key, read the body (size-limited), send a copy with
`max_tokens=1`, `stream=false` to the least-loaded prefill engine (whose KV connector stores
the prompt's KV), then send the caller's original bytes to the least-loaded decode engine (which
loads that KV) and relay its answer: whole, or as server-sent events chunk by chunk as they
arrive. If prefill fails the decode engine computes the prompt itself (unless configured to
fail); engines' own error answers are passed through unchanged; the proxy's own errors use the
OpenAI error shape. A caller that disconnects cancels whatever upstream request is running.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from splitwise_local.proxy.errors import error_body, error_response
from splitwise_local.proxy.metrics import ProxyMetrics, RequestRecord
from splitwise_local.proxy.pool import Endpoint, EnginePool
from splitwise_local.proxy.settings import ProxySettings

log = logging.getLogger(__name__)

COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions")
# Not forwarded from an engine's answer: they describe one hop, or the response re-computes them.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authenticate", "content-length", "date", "server"}
)  # fmt: skip
# Keep-alive connections are dropped before uvicorn's (vLLM's server) 5 s idle timeout closes
# them, so a request never lands on a connection the engine is closing.
KEEPALIVE_EXPIRY_S = 4.0
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the caller left first", used in metrics only
FAILURE_STATUS = {"unreachable": 503, "pool_exhausted": 503, "timeout": 504, "transport": 502}


class UpstreamFailure(Exception):
    """No answer from an engine of `role`; `kind` names why (for metrics and the status)."""

    def __init__(self, role: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.role = role
        self.kind = kind

    @property
    def metric_kind(self) -> str:
        return f"{self.role}_{self.kind}"

    def response(self) -> JSONResponse:
        return error_response(FAILURE_STATUS.get(self.kind, 502), str(self), code=self.metric_kind)


class BodyTooLarge(Exception):
    pass


def failure_kind(exc: httpx.HTTPError) -> str:
    """Sorts transport failures into what the proxy does about them."""
    if isinstance(exc, httpx.PoolTimeout):
        return "pool_exhausted"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "unreachable"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "transport"


def prefill_body(request: dict) -> bytes:
    """The prefill engine's copy: one token, not streamed; only its KV cache is wanted.

    `min_tokens` is dropped because vLLM rejects `min_tokens > max_tokens`.
    """
    body = {k: v for k, v in request.items() if k not in ("stream_options", "min_tokens")}
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body["stream"] = False
    return json.dumps(body, separators=(",", ":")).encode()


def relayed_headers(upstream: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}


def passthrough(upstream: httpx.Response) -> Response:
    """An engine's (already read) answer, status and body unchanged."""
    return Response(upstream.content, upstream.status_code, headers=relayed_headers(upstream))


async def close_shielded(upstream: httpx.Response) -> None:
    """Closes an upstream response even while the caller's task is being cancelled.

    Closing a response that is not fully read drops its connection, which is what tells the
    engine to abort the request; under anyio's cancellation a plain await here would be
    cancelled again before the socket is closed.
    """
    with anyio.CancelScope(shield=True):
        await upstream.aclose()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (before reading it all) one over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class RelayResponse(StreamingResponse):
    """A streamed answer that always closes its source, and reports when it is done.

    Starlette leaves a body iterator it stopped reading (caller gone) for the garbage
    collector; closing it here releases the upstream connection and the engine's slot at once.
    """

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        upstream: httpx.Response,
        record: RequestRecord,
    ) -> None:
        super().__init__(content, upstream.status_code, headers=relayed_headers(upstream))
        self._content = content
        self._record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._content.aclose()
            self._record.finish(self.status_code)


class Proxy:
    """The routes' shared state: settings, engine pools, metrics and the upstream client."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        backoff = (settings.backoff_initial_s, settings.backoff_max_s)
        self.prefill = EnginePool("prefill", settings.prefill, *backoff)
        self.decode = EnginePool("decode", settings.decode, *backoff)
        self.metrics = ProxyMetrics([self.prefill, self.decode])
        connect = settings.connect_timeout_s
        self._prefill_timeout = httpx.Timeout(settings.prefill_timeout_s, connect=connect)
        self._decode_timeout = httpx.Timeout(settings.decode_timeout_s, connect=connect)
        self._client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(
            max_connections=self.settings.max_connections,
            max_keepalive_connections=self.settings.max_connections,
            keepalive_expiry=KEEPALIVE_EXPIRY_S,
        )
        # identity: engines' bytes are relayed raw, so they must not arrive compressed.
        async with httpx.AsyncClient(
            limits=limits, timeout=self._decode_timeout, headers={"accept-encoding": "identity"}
        ) as client:
            self._client = client
            try:
                yield
            finally:
                self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the proxy app is used outside its lifespan")
        return self._client

    # -- routes ------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        route = request.url.path
        record = self.metrics.start(route)
        try:
            accepted = await self._accept(request)
            if isinstance(accepted, Response):
                response: Response | None = accepted
            else:
                raw, body = accepted
                forward = self._forward(route, raw, body, self._headers(request), record)
                response = await self._until_disconnect(request, forward)
        except BaseException:
            record.finish(500)
            raise
        if response is None:
            self.metrics.errors.labels("client_disconnected").inc()
            record.finish(CLIENT_CLOSED_REQUEST)
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        if not isinstance(response, RelayResponse):
            record.finish(response.status_code)
        return response

    async def models(self, request: Request) -> Response:
        if (denied := self._deny(request)) is not None:
            return denied
        try:
            headers = self._headers(request)
            endpoint, upstream = await self._send(
                self.decode,
                lambda e: self.client.build_request("GET", e.url + "/v1/models", headers=headers),
                stream=False,
            )
        except UpstreamFailure as failure:
            self.metrics.errors.labels(failure.metric_kind).inc()
            return failure.response()
        self.decode.release(endpoint)
        return passthrough(upstream)

    async def health(self, request: Request) -> Response:
        timeout = self.settings.health_timeout_s
        prefill, decode = await asyncio.gather(
            self.prefill.probe(self.client, timeout), self.decode.probe(self.client, timeout)
        )
        healthy = any(prefill.values()) and any(decode.values())
        body = {
            "status": "ok" if healthy else "unavailable",
            "prefill": {url: "up" if up else "down" for url, up in prefill.items()},
            "decode": {url: "up" if up else "down" for url, up in decode.items()},
            "down": [url for states in (prefill, decode) for url, up in states.items() if not up],
        }
        return JSONResponse(body, 200 if healthy else 503)

    async def metrics_page(self, request: Request) -> Response:
        text, content_type = self.metrics.render()
        return Response(text, headers={"content-type": content_type})

    # -- one completion ----------------------------------------------------------------------

    async def _accept(self, request: Request) -> tuple[bytes, dict] | Response:
        """The caller's raw body and its parsed JSON object, or the error answer for it."""
        if (denied := self._deny(request)) is not None:
            return denied
        try:
            raw = await read_body(request, self.settings.max_body_bytes)
        except ClientDisconnect:
            self.metrics.errors.labels("client_disconnected").inc()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except BodyTooLarge:
            self.metrics.errors.labels("body_too_large").inc()
            limit = self.settings.max_body_bytes
            return error_response(413, f"request body is over {limit} bytes", "body_too_large")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            self.metrics.errors.labels("bad_request").inc()
            return error_response(400, f"request body is not valid JSON: {exc}", "invalid_json")
        if not isinstance(body, dict):
            self.metrics.errors.labels("bad_request").inc()
            return error_response(400, "request body must be a JSON object", "invalid_json")
        return raw, body

    async def _forward(
        self, route: str, raw: bytes, body: dict, headers: dict[str, str], record: RequestRecord
    ) -> Response:
        refused = await self._prefill(route, body, headers)
        if refused is not None:
            return refused
        return await self._decode(route, raw, headers, record)

    async def _prefill(self, route: str, body: dict, headers: dict[str, str]) -> Response | None:
        """Runs prefill; None means go on to decode (prefilled, or falling back)."""
        payload = prefill_body(body)
        started = time.perf_counter()
        answer: httpx.Response | None = None
        try:
            endpoint, answer = await self._send(
                self.prefill,
                lambda e: self.client.build_request(
                    "POST",
                    e.url + route,
                    content=payload,
                    headers=headers,
                    timeout=self._prefill_timeout,
                ),
                stream=False,
            )
        except UpstreamFailure as exc:
            failure = exc
        else:
            self.prefill.release(endpoint)
            if answer.is_success:
                self.metrics.prefill_seconds.labels(endpoint.url).observe(
                    time.perf_counter() - started
                )
                return None
            kind = "rejected" if answer.is_client_error else "error"
            failure = UpstreamFailure(
                "prefill", kind, f"prefill engine answered {answer.status_code}"
            )
        self.metrics.errors.labels(failure.metric_kind).inc()
        if self.settings.fallback_to_decode:
            self.metrics.prefill_fallbacks.inc()
            log.info("prefill failed (%s); decode computes the prompt itself", failure)
            return None
        return passthrough(answer) if answer is not None else failure.response()

    async def _decode(
        self, route: str, raw: bytes, headers: dict[str, str], record: RequestRecord
    ) -> Response:
        started = time.perf_counter()
        try:
            endpoint, upstream = await self._send(
                self.decode,
                lambda e: self.client.build_request(
                    "POST", e.url + route, content=raw, headers=headers
                ),
                stream=True,
            )
        except UpstreamFailure as failure:
            self.metrics.errors.labels(failure.metric_kind).inc()
            return failure.response()
        ttft = self.metrics.decode_ttft_seconds.labels(endpoint.url)
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            chunks = self._relay(
                upstream, endpoint, lambda: ttft.observe(time.perf_counter() - started)
            )
            return RelayResponse(chunks, upstream, record)
        try:
            await upstream.aread()
        except httpx.HTTPError as exc:
            failure = self._failed(self.decode, endpoint, exc)
            return failure.response()
        finally:
            await close_shielded(upstream)
            self.decode.release(endpoint)
        ttft.observe(time.perf_counter() - started)
        return passthrough(upstream)

    async def _relay(
        self, upstream: httpx.Response, endpoint: Endpoint, first_chunk: Callable[[], None]
    ) -> AsyncGenerator[bytes, None]:
        """Yields the engine's bytes as they arrive; a broken stream ends with an error event."""
        waiting_first = True
        try:
            async for chunk in upstream.aiter_raw():
                if waiting_first:
                    first_chunk()
                    waiting_first = False
                yield chunk
        except httpx.HTTPError as exc:
            failure = self._failed(self.decode, endpoint, exc)
            yield f"data: {json.dumps(error_body(502, str(failure)))}\n\ndata: [DONE]\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.errors.labels("client_disconnected").inc()
            raise
        finally:
            await close_shielded(upstream)
            self.decode.release(endpoint)

    # -- helpers -----------------------------------------------------------------------------

    async def _send(
        self,
        pool: EnginePool,
        build: Callable[[Endpoint], httpx.Request],
        stream: bool,
    ) -> tuple[Endpoint, httpx.Response]:
        """Sends to the least-loaded engine, moving on while engines cannot be reached.

        Only connection failures move on (the request never left); the returned endpoint stays
        counted in flight until the caller releases it.
        """
        tried: list[Endpoint] = []
        while (endpoint := pool.acquire(exclude=tried)) is not None:
            tried.append(endpoint)
            try:
                response = await self.client.send(build(endpoint), stream=stream)
            except httpx.HTTPError as exc:
                pool.release(endpoint)
                failure = self._failed(pool, endpoint, exc)
                if failure.kind == "unreachable":
                    continue
                raise failure from exc
            pool.mark_up(endpoint)
            return endpoint, response
        if tried:
            message = f"no {pool.role} engine reachable (tried {', '.join(e.url for e in tried)})"
        else:
            message = f"every {pool.role} engine is marked down after failing; retrying later"
        raise UpstreamFailure(pool.role, "unreachable", message)

    def _failed(
        self, pool: EnginePool, endpoint: Endpoint, exc: httpx.HTTPError
    ) -> UpstreamFailure:
        """Marks the engine down unless the proxy itself was the bottleneck; names the failure."""
        kind = failure_kind(exc)
        reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
        if kind != "pool_exhausted":
            pool.mark_down(endpoint, reason)
        return UpstreamFailure(pool.role, kind, f"{pool.role} engine {endpoint.url}: {reason}")

    def _deny(self, request: Request) -> Response | None:
        """A 401 unless the caller shows the configured API key (constant-time compare)."""
        key = self.settings.api_key
        if key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip(), key):
            return None
        self.metrics.errors.labels("unauthorized").inc()
        return error_response(401, "missing or wrong API key", "invalid_api_key")

    def _headers(self, request: Request) -> dict[str, str]:
        """Headers for the engines: JSON, the API key (ours, else the caller's), request id."""
        headers = {"content-type": "application/json"}
        key = self.settings.api_key
        auth = f"Bearer {key}" if key else request.headers.get("authorization")
        if auth:
            headers["authorization"] = auth
        if request_id := request.headers.get("x-request-id"):
            headers["x-request-id"] = request_id
        return headers

    async def _until_disconnect(
        self, request: Request, work: Awaitable[Response]
    ) -> Response | None:
        """Runs `work`, cancelling it if the caller disconnects first (then returns None).

        Only once the body is read: until then `receive` carries the body, not disconnects.
        """
        response: Response | None = None

        async def watch(scope: anyio.CancelScope) -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            response = await work
            group.cancel_scope.cancel()
        return response


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("proxy error on %s", request.url.path, exc_info=exc)
    return error_response(500, f"internal proxy error: {type(exc).__name__}", "internal_error")


def build_app(settings: ProxySettings) -> Starlette:
    """The proxy as an ASGI app; it opens its upstream client in its lifespan."""
    proxy = Proxy(settings)
    routes = [Route(path, proxy.completions, methods=["POST"]) for path in COMPLETION_ROUTES]
    routes += [
        Route("/v1/models", proxy.models, methods=["GET"]),
        Route("/health", proxy.health, methods=["GET"]),
        Route("/metrics", proxy.metrics_page, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=proxy.lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    app.state.proxy = proxy
    return app
