"""The proxy's OpenTelemetry spans: one trace per caller request, the engines' spans inside it.

With `otlp_traces_endpoint` set, each completion request gets a server span (`POST
/v1/chat/completions`, parented on the caller's `traceparent` when it sends one) with a child
for each step the request takes: `proxy.route` (tokenizing and asking the store), `proxy.admission`
(admitted or refused, with the role's queue), `proxy.prefill` (the one-token prefill hop, request
to answer) and `proxy.decode` (the answering engine, request to the last byte relayed;
`proxy.generate` when a prefill engine serves the whole request). Each engine request carries
its hop span's `traceparent`, so vLLM's `llm_request` span and our connector's `splitwise.save`
and `splitwise.load` spans (connector/tracing.py) join the same trace under that hop.

Off (the default), every request carries `UNTRACED`, whose methods do nothing: no OpenTelemetry
object is made on the request path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.requests import Request

from splitwise_local.proxy.routing import Route
from splitwise_local.tracing import open_provider

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

SERVICE = "splitwise-proxy"
Attributes = Mapping[str, AttributeValue]
_PROPAGATOR = TraceContextTextMapPropagator()


class Untraced:
    """A request's trace with tracing off: every call does nothing."""

    def span(
        self, name: str, attributes: Attributes | None = None, client: bool = False
    ) -> Untraced:
        """A child span (`client`: a request to an engine), ended by `end` or with its parent."""
        return self

    def headers(self, base: dict[str, str]) -> dict[str, str]:
        """`base` plus this span's `traceparent`, for a request made inside it."""
        return base

    def set(self, attributes: Attributes) -> None:
        """Adds attributes to the span."""

    def end(self, error: str | None = None, attributes: Attributes | None = None) -> None:
        """Ends the span (and children still open), failed when `error` says why; once."""

    def finish(self, status: int) -> None:
        """Ends a request's span with the HTTP status the caller got."""


UNTRACED = Untraced()


class Traced(Untraced):
    """A span of a traced request; children it started and nobody ended end with it."""

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self._span = span
        self._context = set_span_in_context(span)
        self._open: list[Traced] = []
        self._ended = False

    def span(self, name: str, attributes: Attributes | None = None, client: bool = False) -> Traced:
        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        child = Traced(self._tracer, self._tracer.start_span(name, self._context, kind, attributes))
        self._open.append(child)
        return child

    def headers(self, base: dict[str, str]) -> dict[str, str]:
        carrier = dict(base)
        _PROPAGATOR.inject(carrier, self._context)
        return carrier

    def set(self, attributes: Attributes) -> None:
        self._span.set_attributes(attributes)

    def end(self, error: str | None = None, attributes: Attributes | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        for child in self._open:
            child.end(error or "ended with its parent")
        if attributes:
            self._span.set_attributes(attributes)
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.end()

    def finish(self, status: int) -> None:
        error = f"answered {status}" if status >= 500 else None
        if status == 499:
            error = "the caller left"
        self.end(error, {"http.response.status_code": status})


def route_attributes(route: Route) -> dict[str, AttributeValue]:
    """The routing decision, as span attributes."""
    attributes: dict[str, AttributeValue] = {
        "splitwise.route.path": route.path,
        "splitwise.route.reason": route.reason,
        "splitwise.route.policy": route.policy,
    }
    if route.prompt.tokens is not None:
        attributes["splitwise.prompt_tokens"] = route.prompt.tokens
        attributes["splitwise.stored_tokens"] = route.prompt.stored
    return attributes


class ProxyTracing:
    """The proxy's tracer provider (its own, exporting over OTLP) and each request's root span."""

    def __init__(self, endpoint: str, protocol: str) -> None:
        self.provider: TracerProvider = open_provider(SERVICE, endpoint, protocol)
        self._tracer = self.provider.get_tracer("splitwise_local.proxy")

    def start(self, request: Request) -> Traced:
        """The request's server span, a child of the caller's trace if it sent `traceparent`."""
        path = request.url.path
        parent = _PROPAGATOR.extract(request.headers) if "traceparent" in request.headers else None
        attributes = {"http.request.method": request.method, "http.route": path}
        span = self._tracer.start_span(f"{request.method} {path}", parent, SpanKind.SERVER,
                                       attributes)  # fmt: skip
        return Traced(self._tracer, span)

    def close(self) -> None:
        """Exports what is still queued (bounded by the exporter's timeout), then stops."""
        self.provider.shutdown()
