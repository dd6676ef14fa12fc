"""Carrying out a route (routing.py): the prefill hop, the answering engine, the fallbacks.

On the disaggregated path a copy of the request with `max_tokens=1`, `stream=false` goes to the
chosen prefill engine (whose KV connector stores the prompt's KV), then the caller's original
bytes go to the chosen decode engine (which loads that KV), whose answer is relayed: whole, or
as server-sent events chunk by chunk as they arrive (after the first event, so a stream the
engine refuses at once is still answered with a plain 4xx). A hop that fails moves the request
to the route the router named for that failure, if any: a failed prefill to decode alone, a
decode pool with no engine to reach to a prefill engine serving the whole request. Engines' own
error answers are passed through unchanged; the proxy's own errors use the OpenAI error shape.

When it is done the forwarder tells the router, once, which engines computed or loaded the
prompt (their prefix caches now hold it), counts the route taken, and tells the admission ticket
as each hop gets its first answer; the router also hears how long each prefill answer and each
stream's first event took (what a prompt token costs on that engine). Each engine request is a
span of the caller's trace (when traced) and carries its `traceparent`, so the engine's own
spans join the trace under it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import aiohttp
import anyio
from opentelemetry.util.types import AttributeValue
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from splitwise_local.proxy.admission import Ticket
from splitwise_local.proxy.errors import error_body, stream_refusal
from splitwise_local.proxy.metrics import ProxyMetrics, RequestRecord
from splitwise_local.proxy.pool import Endpoint, EnginePool, Role
from splitwise_local.proxy.routing import PREFILL_ONLY, ROUTE_HEADER, Hop, Json, Route, Router
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.proxy.tracing import Untraced, route_attributes
from splitwise_local.proxy.upstream import UPSTREAM_ERRORS, Upstream, UpstreamFailure, timeout

log = logging.getLogger(__name__)

# Not forwarded from an engine's answer: they describe one hop, or the response re-computes them.
HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-authenticate", "content-length", "date", "server"}
)  # fmt: skip
# Dropped from the prefill engine's copy: work whose result only the final answer needs (prompt
# and token logprobs, echo, several choices), stream settings, and `min_tokens`, which vLLM
# rejects above `max_tokens`.
PREFILL_DROPPED = frozenset(
    {"prompt_logprobs", "echo", "logprobs", "top_logprobs", "n", "best_of", "stream_options",
     "min_tokens"}
)  # fmt: skip


def prefill_body(request: Json) -> bytes:
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


def hop_attributes(hop: Hop) -> dict[str, AttributeValue]:
    """An engine request's role and the prompt tokens it computes, as span attributes."""
    return {"splitwise.role": hop.role, "splitwise.hop_tokens": hop.tokens}


def answer_attributes(
    endpoint: Endpoint, answer: aiohttp.ClientResponse
) -> dict[str, AttributeValue]:
    """The engine that answered and its status, as span attributes."""
    return {"splitwise.engine": endpoint.url, "http.response.status_code": answer.status}


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


@dataclass(frozen=True)
class Call:
    """A caller's request, as the forwarder sends it on."""

    api_route: str  # /v1/completions or /v1/chat/completions
    raw: bytes  # the caller's body, sent unchanged to the answering engine
    body: Json  # the same, parsed: the prefill copy is made from it
    headers: dict[str, str]  # for the engines
    record: RequestRecord  # counted when the answer is done

    @property
    def trace(self) -> Untraced:
        """The request's span (it ends with the record)."""
        return self.record.trace


class Forwarder:
    """Sends each request along its route to the engines and relays the answer."""

    def __init__(
        self,
        settings: ProxySettings,
        pools: tuple[EnginePool, EnginePool],
        upstream: Upstream,
        metrics: ProxyMetrics,
        router: Router,
    ) -> None:
        self.settings = settings
        self.pools: dict[Role, EnginePool] = {pool.role: pool for pool in pools}
        self.upstream = upstream
        self.metrics = metrics
        self.router = router
        connect = settings.connect_timeout_s
        self._prefill_timeout = timeout(connect, settings.prefill_timeout_s)
        self._decode_timeout = timeout(connect, settings.decode_timeout_s)

    async def forward(self, route: Route, call: Call, ticket: Ticket) -> Response:
        """The caller's answer along `route` (or a fallback of it); the router hears which
        engines served it, and /metrics the route taken."""
        served: list[Endpoint] = []
        taken, response = await self._follow(route, call, ticket, served)
        self.router.served(taken, served)
        call.trace.set(route_attributes(taken))
        self.metrics.routes.labels(*taken.labels).inc()
        if self.settings.route_detail:
            response.headers[ROUTE_HEADER] = taken.header({e.role: e.url for e in served})
        return response

    async def _follow(
        self, route: Route, call: Call, ticket: Ticket, served: list[Endpoint]
    ) -> tuple[Route, Response]:
        """The route taken and its answer: `route`, or the fallback a failed hop leads to."""
        if route.path == PREFILL_ONLY:
            self.metrics.decode_fallbacks.inc()
        if route.prefill is not None:
            failed = await self._prefill(route.prefill, call, ticket, served)
            if failed is not None:
                failure, answer = failed
                if route.if_prefill_fails is None:
                    return route, answer
                self.metrics.prefill_fallbacks.inc()
                log.info("prefill failed (%s); decode computes the prompt itself", failure)
                route = route.if_prefill_fails
        whole = route.if_decode_unreachable
        if whole is None:
            return route, await self._generate(route.generate, call, ticket, served)
        try:
            return route, await self._generate(route.generate, call, ticket, served, True)
        except UpstreamFailure as failure:  # no decode engine reachable: nothing was generated
            self.metrics.errors.labels(failure.metric_kind).inc()
            log.info("%s; a prefill engine serves the whole request", failure)
            self.metrics.decode_fallbacks.inc()
            return whole, await self._generate(whole.generate, call, ticket, served)

    async def _prefill(
        self, hop: Hop, call: Call, ticket: Ticket, served: list[Endpoint]
    ) -> tuple[UpstreamFailure, Response] | None:
        """Runs the prefill hop: None once prefilled, else the failure and the answer the caller
        gets if the route has no fallback for it.

        An engine's refusal (4xx) is a failure too: decode then gives its own verdict, which
        is the answer the caller would have had from one engine.
        """
        pool = self.pools[hop.role]
        started = time.perf_counter()
        answer: aiohttp.ClientResponse | None = None
        body = prefill_body(call.body)
        span = call.trace.span("proxy.prefill", hop_attributes(hop), client=True)
        try:
            endpoint, answer = await self.upstream.send(
                pool, "POST", call.api_route, span.headers(call.headers), self._prefill_timeout,
                body, hop.rank, hop.tokens,
            )  # fmt: skip
            try:
                content = await self.upstream.read(pool, endpoint, answer)
            finally:
                pool.computed(endpoint, hop.tokens)
        except UpstreamFailure as exc:
            ticket.answered(hop.role, ok=False)
            self.metrics.errors.labels(exc.metric_kind).inc()
            span.end(str(exc))
            return exc, self._failed(exc)
        ticket.answered(hop.role, ok=answer.status < 300)
        answered = answer_attributes(endpoint, answer)
        if answer.status < 300:
            elapsed = time.perf_counter() - started
            self.metrics.prefill_seconds.labels(endpoint.url).observe(elapsed)
            self.router.answered(endpoint, hop, elapsed)
            served.append(endpoint)
            span.end(attributes=answered)
            return None
        kind = "rejected" if answer.status < 500 else "error"
        failure = UpstreamFailure("prefill", kind, f"prefill engine answered {answer.status}")
        self.metrics.errors.labels(failure.metric_kind).inc()
        span.end(str(failure), answered)
        return failure, passthrough(answer, content)

    async def _generate(
        self,
        hop: Hop,
        call: Call,
        ticket: Ticket,
        served: list[Endpoint],
        fallible: bool = False,
    ) -> Response:
        """The caller's request on an engine of the hop's role, its answer relayed. `fallible`:
        when no engine of the role can be reached, raise the UpstreamFailure (the route has a
        fallback for it) instead of answering with it."""
        pool = self.pools[hop.role]
        started = time.perf_counter()
        name = "proxy.decode" if hop.role == "decode" else "proxy.generate"
        span = call.trace.span(name, hop_attributes(hop), client=True)
        try:
            endpoint, answer = await self.upstream.send(
                pool, "POST", call.api_route, span.headers(call.headers), self._decode_timeout,
                call.raw, hop.rank, hop.tokens,
            )  # fmt: skip
        except UpstreamFailure as failure:
            ticket.answered(hop.role, ok=False)
            span.end(str(failure))
            if fallible and failure.kind == "unreachable":
                raise
            self.metrics.errors.labels(failure.metric_kind).inc()
            return self._failed(failure)
        served.append(endpoint)
        span.set(answer_attributes(endpoint, answer))
        streamed = answer.content_type == "text/event-stream"
        # A stream is read up to its first event: a refusal there is still a plain 4xx.
        read = self.upstream.first_event if streamed else self.upstream.read
        content: bytes | None = None
        try:
            content = await read(pool, endpoint, answer)
        except UpstreamFailure as failure:  # nothing reached the caller yet: a plain error
            self.metrics.errors.labels(failure.metric_kind).inc()
            span.end(str(failure))
            return self._failed(failure)
        finally:
            pool.computed(endpoint, hop.tokens)
            ticket.answered(hop.role, ok=content is not None and answer.status < 300)
        first_s = time.perf_counter() - started
        self.metrics.decode_ttft_seconds.labels(endpoint.url).observe(first_s)
        if not streamed:
            span.end(None if answer.status < 400 else f"{hop.role} engine answered {answer.status}")
            return passthrough(answer, content)
        if (refused := stream_refusal(content)) is not None:
            self.upstream.finish(pool, endpoint, answer)
            span.end(f"{hop.role} engine refused the stream")
            return refused
        self.router.answered(endpoint, hop, first_s)  # a first token: the prompt is computed
        relay = self._relay(pool, answer, endpoint, content, span)
        return RelayResponse(relay, answer, call.record)

    async def _relay(
        self,
        pool: EnginePool,
        upstream: aiohttp.ClientResponse,
        endpoint: Endpoint,
        head: bytes,
        span: Untraced,
    ) -> AsyncGenerator[bytes, None]:
        """Yields `head` (the stream's first event, already read), then the engine's bytes as
        they arrive; a broken stream ends with an error event. The hop's span ends with it."""
        error = None
        try:
            yield head
            async for chunk in upstream.content.iter_any():
                yield chunk
        except UPSTREAM_ERRORS as exc:
            failure = self.upstream.failed(pool, endpoint, exc)
            self.metrics.errors.labels(f"{failure.metric_kind}_mid_stream").inc()
            error = str(failure)
            message = error if self.settings.route_detail else failure.public
            event = error_body(502, message, code=failure.metric_kind)
            yield f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.errors.labels("client_disconnected").inc()
            error = "the caller left"
            raise
        finally:
            self.upstream.finish(pool, endpoint, upstream)
            span.end(error)

    def _failed(self, failure: UpstreamFailure) -> Response:
        """The caller's answer to an engine failure (engine addresses only with route_detail)."""
        return failure.response(self.settings.retry_after_s, self.settings.route_detail)
