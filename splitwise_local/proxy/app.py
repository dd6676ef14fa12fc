"""The Starlette app: one OpenAI-compatible endpoint in front of prefill and decode engines.

A completion request walks: check the API key, read the body (size-limited), let the router
decide its route (routing.py: through prefill or straight to decode, which engines, and where
to go when a hop fails), admit it or refuse it at once while its engines have more queued than
they can start in time (admission.py), then the forwarder carries the route out and relays the
answer (forward.py). /metrics counts each route taken; only with `route_detail` on does the
answer carry it (`x-splitwise-route`) and do errors and /health name engine addresses. With no
engine to send to the caller gets a 503 with `Retry-After`. A caller that disconnects cancels
whatever upstream request is running. With `otlp_traces_endpoint` set each request is traced,
each step a span (tracing.py).

The launcher, which supervises the engines, tells the proxy of every death and return
(`engine_state`, from any thread): a dead engine gets no new request, and the answers still
being read from it end at once, a stream with an OpenAI-format error event and `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from splitwise_local.proxy.admission import Admission, Refusal
from splitwise_local.proxy.errors import error_response
from splitwise_local.proxy.forward import Call, Forwarder, RelayResponse, passthrough
from splitwise_local.proxy.intake import Refused, check_key, engine_headers, read_json
from splitwise_local.proxy.metrics import ProxyMetrics
from splitwise_local.proxy.pool import EnginePool
from splitwise_local.proxy.routing import Json, Router, build_router
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.proxy.tracing import UNTRACED, ProxyTracing, route_attributes
from splitwise_local.proxy.upstream import Upstream, UpstreamFailure, open_session, timeout

log = logging.getLogger(__name__)

COMPLETION_ROUTES = ("/v1/chat/completions", "/v1/completions")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the caller left first", used in metrics only


@dataclass(frozen=True)
class Running:
    """What exists only while the app runs (its lifespan)."""

    router: Router
    upstream: Upstream
    forwarder: Forwarder
    loop: asyncio.AbstractEventLoop
    tracing: ProxyTracing | None  # None: tracing off


class Proxy:
    """The routes' shared state: settings, engine pools, admission, metrics, and while the app
    runs the router, the upstream session and the forwarder."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        backoff = (settings.backoff_initial_s, settings.backoff_max_s)
        self.prefill = EnginePool("prefill", settings.prefill, *backoff)
        self.decode = EnginePool("decode", settings.decode, *backoff)
        self.admission = Admission(settings, (self.prefill, self.decode))
        self.metrics = ProxyMetrics([self.prefill, self.decode], self.admission.queues.values())
        self._models_timeout = timeout(settings.connect_timeout_s, settings.decode_timeout_s)
        self._running: Running | None = None

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """For the app's life: the router (its tokenizer takes seconds to load: off the event loop)
        and the session to the engines; both closed after."""
        router = await asyncio.to_thread(
            build_router, self.settings, self.prefill, self.decode, self._served_models
        )
        endpoint, protocol = self.settings.otlp_traces_endpoint, self.settings.otlp_traces_protocol
        tracing = ProxyTracing(endpoint, protocol) if endpoint is not None else None
        try:
            async with open_session(self.settings.max_connections) as session:
                upstream = Upstream(session)
                pools = (self.prefill, self.decode)
                forwarder = Forwarder(self.settings, pools, upstream, self.metrics, router)
                loop = asyncio.get_running_loop()
                self._running = Running(router, upstream, forwarder, loop, tracing)
                try:
                    yield
                finally:
                    self._running = None
        finally:
            await router.close()
            if tracing is not None:  # its last spans are exported, off the event loop
                await asyncio.to_thread(tracing.close)

    @property
    def running(self) -> Running:
        """The router, session and forwarder; there only inside the app's lifespan."""
        if self._running is None:
            raise RuntimeError("the proxy app is used outside its lifespan")
        return self._running

    # -- routes ------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        """`/v1/completions` and `/v1/chat/completions`: routed, relayed, and counted whatever
        happens (the caller leaving included)."""
        api_route = request.url.path
        tracing = self._running.tracing if self._running is not None else None
        trace = tracing.start(request) if tracing is not None else UNTRACED
        record = self.metrics.start(api_route, trace)
        try:
            accepted = await self._accept(request)
            if isinstance(accepted, Response):
                response: Response | None = accepted
            else:
                headers = engine_headers(request, self.settings.api_key)
                call = Call(api_route, *accepted, headers, record)
                response = await self._until_disconnect(request, self._serve(call))
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
        try:
            check_key(request, self.settings.api_key)
        except Refused as refused:
            self.metrics.errors.labels(refused.kind).inc()
            return refused.response
        upstream = self.running.upstream
        pool = self.running.router.generating_pool()
        headers = engine_headers(request, self.settings.api_key)
        try:
            endpoint, answer = await upstream.send(
                pool, "GET", "/v1/models", headers, self._models_timeout
            )
            body = await upstream.read(pool, endpoint, answer)
        except UpstreamFailure as failure:
            self.metrics.errors.labels(failure.metric_kind).inc()
            return failure.response(self.settings.retry_after_s, self.settings.route_detail)
        return passthrough(answer, body)

    async def health(self, request: Request) -> Response:
        """200 while requests can be answered ("degraded" when some engine is down, requests
        then routed around it), else 503."""
        session, limit = self.running.upstream.session, self.settings.health_timeout_s
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
        running = self._running
        if running is not None and not running.loop.is_closed():
            running.loop.call_soon_threadsafe(self._set_engine_state, url, up, cause)

    def _set_engine_state(self, url: str, up: bool, cause: str) -> None:
        if self._running is None:
            return
        for pool in (self.prefill, self.decode):
            endpoint = pool.find(url)
            if endpoint is None:
                continue
            if up:
                pool.mark_alive(endpoint)
            else:
                pool.mark_dead(endpoint, cause or "its supervisor saw it die")
                closed = self._running.upstream.abort(endpoint)
                if closed:
                    log.warning("closed %d answer(s) in flight on %s", closed, url)

    # -- one completion ----------------------------------------------------------------------

    async def _accept(self, request: Request) -> tuple[bytes, Json] | Response:
        """The caller's raw body and its parsed JSON object, or the error answer for it."""
        try:
            check_key(request, self.settings.api_key)
            return await read_json(request, self.settings.max_body_bytes)
        except ClientDisconnect:
            self.metrics.errors.labels("client_disconnected").inc()
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        except Refused as refused:
            self.metrics.errors.labels(refused.kind).inc()
            return refused.response

    async def _serve(self, call: Call) -> Response:
        """Routes the call, admits it (or refuses it at once) and forwards it; its admission
        ticket is closed however forwarding ends, the caller leaving included."""
        running = self.running
        routing = call.trace.span("proxy.route")
        route = await running.router.route(call.api_route, call.body)
        routing.end(attributes=route_attributes(route))
        admission = call.trace.span("proxy.admission")
        ticket = self.admission.admit(route, len(call.raw))
        role = (route.prefill or route.generate).role
        queued = {
            "splitwise.role": role,
            "splitwise.queued_tokens": self.admission.queues[role].queued,
        }
        if isinstance(ticket, Refusal):
            admission.end("refused", {**queued, "splitwise.retry_after_s": ticket.retry_after_s})
            return ticket.response()
        admission.end(attributes=queued)
        try:
            return await running.forwarder.forward(route, call, ticket)
        finally:
            ticket.close()

    # -- helpers -----------------------------------------------------------------------------

    async def _served_models(self) -> Json:
        """An engine's `/v1/models` (decode's, prefill's while no decode engine is up): the
        router learns the LoRA adapters' names and paths from it."""
        pool = self.running.router.generating_pool()
        now = time.monotonic()
        endpoint = next((e for e in pool.endpoints if e.available(now)), None)
        if endpoint is None:
            raise LookupError(f"no {pool.role} engine to ask")
        key = self.settings.api_key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        limit = aiohttp.ClientTimeout(total=self.settings.health_timeout_s)
        async with self.running.upstream.session.get(
            endpoint.url + "/v1/models", headers=headers, timeout=limit
        ) as answer:
            answer.raise_for_status()
            models: Json = await answer.json()
            return models

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
