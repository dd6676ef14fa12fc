"""The Starlette app: one OpenAI-compatible endpoint in front of prefill and decode engines.

A completion request walks: check the API key, read the body (size-limited), let the router
decide its route (routing.py: through prefill or straight to decode, and which engines), then,
through prefill, send a copy with `max_tokens=1`, `stream=false` to the chosen prefill engine
(whose KV connector stores the prompt's KV), and send the caller's original bytes to the chosen
decode engine (which loads that KV) and relay its answer: whole, or as server-sent events chunk
by chunk as they arrive (after the first event, so a stream the engine refuses at once is still
answered with a plain 4xx). /metrics counts each decision; only with `route_detail` on does the
answer carry it (`x-splitwise-route`) and do errors and /health name engine addresses. If
prefill fails the decode engine computes the prompt itself (unless configured to fail); if no
decode engine can be reached a prefill engine, a complete vLLM engine, serves the whole
request, and with neither the caller gets a 503 with `Retry-After`. Engines' own error answers
are passed through unchanged; the proxy's own errors use the OpenAI error shape. A caller that
disconnects cancels whatever upstream request is running.

The launcher, which supervises the engines, tells the proxy of every death and return
(`engine_state`, from any thread): a dead engine gets no new request, and the answers still
being read from it end at once, a stream with an OpenAI-format error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import aiohttp
import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from splitwise_local.proxy.errors import error_body, error_response, stream_refusal
from splitwise_local.proxy.metrics import ProxyMetrics, RequestRecord
from splitwise_local.proxy.pool import Endpoint, EnginePool, Rank
from splitwise_local.proxy.routing import (
    DISAGGREGATED,
    ROUTE_HEADER,
    Decision,
    Router,
    build_router,
)
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.proxy.upstream import (
    UPSTREAM_ERRORS,
    Upstream,
    UpstreamFailure,
    open_session,
    timeout,
)

log = logging.getLogger(__name__)

COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions")
# Not forwarded from an engine's answer: they describe one hop, or the response re-computes them.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authenticate", "content-length", "date", "server"}
)  # fmt: skip
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the caller left first", used in metrics only


class BodyTooLarge(Exception):
    """The caller's body is over `max_body_bytes`: answered 413, never read whole."""


# Dropped from the prefill engine's copy: work whose result only the final answer needs (prompt
# and token logprobs, echo, several choices), stream settings, and `min_tokens`, which vLLM
# rejects above `max_tokens`.
PREFILL_DROPPED = frozenset(
    {"prompt_logprobs", "echo", "logprobs", "top_logprobs", "n", "best_of", "stream_options",
     "min_tokens"}
)  # fmt: skip


def prefill_body(request: dict) -> bytes:
    """The prefill engine's copy: one token, one choice, not streamed; only its KV cache is
    wanted (`PREFILL_DROPPED` says what else goes)."""
    body = {k: v for k, v in request.items() if k not in PREFILL_DROPPED}
    body["max_tokens"] = 1
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    body["stream"] = False
    return json.dumps(body, separators=(",", ":")).encode()


def relayed_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    """An engine's response headers without the hop-by-hop ones (they describe its connection
    to us, not ours to the caller)."""
    return {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}


def passthrough(upstream: aiohttp.ClientResponse, body: bytes) -> Response:
    """An engine's answer, status and body unchanged."""
    return Response(body, upstream.status, headers=relayed_headers(upstream))


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
        upstream: aiohttp.ClientResponse,
        record: RequestRecord,
    ) -> None:
        super().__init__(content, upstream.status, headers=relayed_headers(upstream))
        self._content = content
        self._record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Relays the engine's stream; however it ends (its end, an error, the caller gone) the
        upstream response is closed and the request counted, exactly once."""
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._content.aclose()
            self._record.finish(self.status_code)


class Proxy:
    """The routes' shared state: settings, engine pools, metrics and the upstream session."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        backoff = (settings.backoff_initial_s, settings.backoff_max_s)
        self.prefill = EnginePool("prefill", settings.prefill, *backoff)
        self.decode = EnginePool("decode", settings.decode, *backoff)
        self.metrics = ProxyMetrics([self.prefill, self.decode])
        self.router = Router(settings, self.prefill, self.decode)
        connect = settings.connect_timeout_s
        self._prefill_timeout = timeout(connect, settings.prefill_timeout_s)
        self._decode_timeout = timeout(connect, settings.decode_timeout_s)
        self._upstream: Upstream | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """For the app's life: the router (its tokenizer takes seconds to load: off the event loop)
        and the session to the engines; both closed after."""
        self.router = await asyncio.to_thread(
            build_router, self.settings, self.prefill, self.decode, self._served_models
        )
        async with open_session(self.settings.max_connections) as session:
            self._upstream = Upstream(session)
            self._loop = asyncio.get_running_loop()
            try:
                yield
            finally:
                self._upstream = None
                self._loop = None
                await self.router.close()

    @property
    def upstream(self) -> Upstream:
        """The session to the engines; there only inside the app's lifespan."""
        if self._upstream is None:
            raise RuntimeError("the proxy app is used outside its lifespan")
        return self._upstream

    # -- routes ------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        """`/v1/completions` and `/v1/chat/completions`: routed, relayed, and counted whatever
        happens (the caller leaving included)."""
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
        """`/v1/models`, answered by an engine that generates (decode; prefill while no decode
        engine is up)."""
        if (denied := self._deny(request)) is not None:
            return denied
        pool = self._generating_pool()
        try:
            endpoint, answer = await self.upstream.send(
                pool, "GET", "/v1/models", self._headers(request), self._decode_timeout
            )
            body = await self.upstream.read(pool, endpoint, answer)
        except UpstreamFailure as failure:
            self.metrics.errors.labels(failure.metric_kind).inc()
            return self._failed(failure)
        return passthrough(answer, body)

    async def health(self, request: Request) -> Response:
        """200 while requests can be answered ("degraded" when some engine is down, requests
        then routed around it), else 503."""
        session, limit = self.upstream.session, self.settings.health_timeout_s
        prefill, decode = await asyncio.gather(
            self.prefill.probe(session, limit), self.decode.probe(session, limit)
        )
        servable = any(decode.values()) or (
            self.settings.fallback_to_prefill and any(prefill.values())
        )
        everything = all(prefill.values()) and all(decode.values())
        if not self.settings.route_detail:  # engines by role and number, not by address
            prefill, decode = (
                {f"{role} {i}": up for i, up in enumerate(states.values())}
                for role, states in (("prefill", prefill), ("decode", decode))
            )
        body = {
            "status": "unavailable" if not servable else "ok" if everything else "degraded",
            "prefill": {name: "up" if up else "down" for name, up in prefill.items()},
            "decode": {name: "up" if up else "down" for name, up in decode.items()},
            "down": [name for states in (prefill, decode) for name, up in states.items() if not up],
        }
        return JSONResponse(body, 200 if servable else 503)

    async def metrics_page(self, request: Request) -> Response:
        """Prometheus's text page of the proxy's registry (and of the supervisor's children when
        the launcher runs the proxy)."""
        text, content_type = self.metrics.render()
        return Response(text, headers={"content-type": content_type})

    # -- what the engines' supervisor says ---------------------------------------------------

    def engine_state(self, url: str, up: bool, cause: str = "") -> None:
        """An engine died (`up` false: out of rotation, its answers in flight closed now) or
        serves again. Callable from any thread (the supervisor's watchers): the change is made
        on the proxy's event loop, soon after. Unknown URLs are ignored."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set_engine_state, url, up, cause)

    def _set_engine_state(self, url: str, up: bool, cause: str) -> None:
        if self._upstream is None:
            return
        for pool in (self.prefill, self.decode):
            endpoint = pool.find(url)
            if endpoint is None:
                continue
            if up:
                pool.mark_alive(endpoint)
            else:
                pool.mark_dead(endpoint, cause or "its supervisor saw it die")
                closed = self.upstream.abort(endpoint)
                if closed:
                    log.warning("closed %d answer(s) in flight on %s", closed, url)

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
        decision = await self.router.decide(route, body)
        response = await self._follow(decision, route, raw, body, headers, record)
        if self.settings.route_detail:
            response.headers[ROUTE_HEADER] = decision.header()
        self.metrics.routes.labels(*decision.labels).inc()
        return response

    async def _follow(
        self,
        decision: Decision,
        route: str,
        raw: bytes,
        body: dict,
        headers: dict[str, str],
        record: RequestRecord,
    ) -> Response:
        """The request along `decision`'s path, or around engines that are down."""
        if self._generating_pool() is self.prefill:  # no decode engine up: no split either
            self.metrics.decode_fallbacks.inc()
            decision.whole_on_prefill()
            return await self._generate(self.prefill, route, raw, headers, record, decision)
        if decision.path == DISAGGREGATED:
            refused = await self._prefill(route, body, headers, decision)
            if refused is not None:
                return refused
        fallible = self.settings.fallback_to_prefill
        try:
            return await self._generate(
                self.decode, route, raw, headers, record, decision, fallible
            )
        except UpstreamFailure as failure:  # no decode engine reachable: nothing was generated
            self.metrics.errors.labels(failure.metric_kind).inc()
            log.info("%s; a prefill engine serves the whole request", failure)
            self.metrics.decode_fallbacks.inc()
            decision.whole_on_prefill()
            return await self._generate(self.prefill, route, raw, headers, record, decision)

    def _generating_pool(self) -> EnginePool:
        """The decode engines, or the prefill engines while no decode engine is in rotation
        (and the proxy is allowed to fall back)."""
        if self.settings.fallback_to_prefill and not self.decode.any_available():
            return self.prefill
        return self.decode

    async def _prefill(
        self, route: str, body: dict, headers: dict[str, str], decision: Decision
    ) -> Response | None:
        """Runs prefill; None means go on to decode (prefilled, or falling back).

        An engine's refusal (4xx) falls back too: decode then gives its own verdict, which
        is the answer the caller would have had from one engine.
        """
        started = time.perf_counter()
        answer: aiohttp.ClientResponse | None
        tokens = self.router.tokens_for("prefill", decision)
        try:
            endpoint, answer = await self.upstream.send(
                self.prefill, "POST", route, headers, self._prefill_timeout, prefill_body(body),
                self.router.rank_for("prefill", decision), tokens,
            )  # fmt: skip
            decision.prefill = endpoint.url
            try:
                content = await self.upstream.read(self.prefill, endpoint, answer)
            finally:
                self.prefill.computed(endpoint, tokens)
        except UpstreamFailure as exc:
            failure, answer = exc, None
        else:
            if answer.status < 300:
                elapsed = time.perf_counter() - started
                self.metrics.prefill_seconds.labels(endpoint.url).observe(elapsed)
                self.router.served(endpoint, decision)
                return None
            kind = "rejected" if answer.status < 500 else "error"
            failure = UpstreamFailure("prefill", kind, f"prefill engine answered {answer.status}")
        self.metrics.errors.labels(failure.metric_kind).inc()
        if self.settings.fallback_to_decode:
            self.metrics.prefill_fallbacks.inc()
            decision.fall_back("prefill_failed")
            log.info("prefill failed (%s); decode computes the prompt itself", failure)
            return None
        if answer is not None:
            return passthrough(answer, content)
        return self._failed(failure)

    async def _generate(
        self,
        pool: EnginePool,
        route: str,
        raw: bytes,
        headers: dict[str, str],
        record: RequestRecord,
        decision: Decision,
        fallible: bool = False,
    ) -> Response:
        """The caller's request on an engine of `pool`, its answer relayed. `fallible`: when
        no engine of the pool can be reached, raise the UpstreamFailure (the caller has another
        pool to try) instead of answering with it."""
        started = time.perf_counter()
        tokens = self.router.tokens_for(pool.role, decision)
        rank: Rank = self.router.rank_for(pool.role, decision)
        try:
            endpoint, answer = await self.upstream.send(
                pool, "POST", route, headers, self._decode_timeout, raw, rank, tokens
            )
        except UpstreamFailure as failure:
            if fallible and failure.kind == "unreachable":
                raise
            self.metrics.errors.labels(failure.metric_kind).inc()
            return self._failed(failure)
        setattr(decision, pool.role, endpoint.url)
        self.router.served(endpoint, decision)
        streamed = answer.content_type == "text/event-stream"
        # A stream is read up to its first event: a refusal there is still a plain 4xx.
        read = self.upstream.first_event if streamed else self.upstream.read
        try:
            content = await read(pool, endpoint, answer)
        except UpstreamFailure as failure:  # nothing reached the caller yet: a plain error
            self.metrics.errors.labels(failure.metric_kind).inc()
            return self._failed(failure)
        finally:
            pool.computed(endpoint, tokens)
        self.metrics.decode_ttft_seconds.labels(endpoint.url).observe(time.perf_counter() - started)
        if not streamed:
            return passthrough(answer, content)
        if (refused := stream_refusal(content)) is not None:
            self.upstream.finish(pool, endpoint, answer)
            return refused
        return RelayResponse(self._relay(pool, answer, endpoint, content), answer, record)

    async def _relay(
        self,
        pool: EnginePool,
        upstream: aiohttp.ClientResponse,
        endpoint: Endpoint,
        head: bytes,
    ) -> AsyncGenerator[bytes, None]:
        """Yields `head` (the stream's first event, already read), then the engine's bytes as
        they arrive; a broken stream ends with an error event."""
        try:
            yield head
            async for chunk in upstream.content.iter_any():
                yield chunk
        except UPSTREAM_ERRORS as exc:
            failure = self.upstream.failed(pool, endpoint, exc)
            self.metrics.errors.labels(f"{failure.metric_kind}_mid_stream").inc()
            message = str(failure) if self.settings.route_detail else failure.public
            event = error_body(502, message, code=failure.metric_kind)
            yield f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.errors.labels("client_disconnected").inc()
            raise
        finally:
            self.upstream.finish(pool, endpoint, upstream)

    # -- helpers -----------------------------------------------------------------------------

    def _deny(self, request: Request) -> Response | None:
        """A 401 unless the caller shows the configured API key (constant-time compare), and
        for a credential that is not ASCII whether a key is configured or not: it can be
        neither compared as text nor forwarded to the engines as sent."""
        auth = request.headers.get("authorization")
        key = self.settings.api_key
        if auth is not None and not auth.isascii():
            message = "malformed Authorization header"
        elif key is None:
            return None
        else:
            scheme, _, token = (auth or "").partition(" ")
            sent = token.strip().encode()
            if scheme.lower() == "bearer" and hmac.compare_digest(sent, key.encode()):
                return None
            message = "missing or wrong API key"
        self.metrics.errors.labels("unauthorized").inc()
        return error_response(401, message, "invalid_api_key")

    def _failed(self, failure: UpstreamFailure) -> Response:
        """The caller's answer to an engine failure (engine addresses only with route_detail)."""
        return failure.response(self.settings.retry_after_s, self.settings.route_detail)

    async def _served_models(self) -> dict:
        """An engine's `/v1/models` (decode's, prefill's while no decode engine is up): the
        router learns the LoRA adapters' names and paths from it."""
        pool = self._generating_pool()
        now = time.monotonic()
        endpoint = next((e for e in pool.endpoints if e.available(now)), None)
        if endpoint is None:
            raise LookupError(f"no {pool.role} engine to ask")
        headers = self._engine_auth()
        limit = aiohttp.ClientTimeout(total=self.settings.health_timeout_s)
        async with self.upstream.session.get(
            endpoint.url + "/v1/models", headers=headers, timeout=limit
        ) as answer:
            answer.raise_for_status()
            return await answer.json()

    def _engine_auth(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"authorization": f"Bearer {key}"} if key else {}

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
    """The proxy as an ASGI app; it opens its upstream session in its lifespan."""
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
