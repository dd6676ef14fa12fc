"""The connector's spans, `splitwise.save` and `splitwise.load`, inside each request's trace.

An engine started with `--otlp-traces-endpoint` keeps each request's W3C trace headers
(`Request.trace_headers`: the proxy's hop span, when the proxy traces). The scheduler side puts
the request's `traceparent` string into the plans it hands the workers (`LoadPlan.trace`,
`SavePlan.trace`); they may run in another process, so the parent crosses as that string, not
as a context object. The loader and saver then record each load and save as a child of it, with
the times they measured (start and end in nanoseconds since the epoch) and what they moved.

The worker exports through a tracer provider of its own to the endpoint vLLM sets in
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` for its processes, in the protocol of
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`; without that variable there is no tracer at all. A
request that came without trace context gets no spans.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from splitwise_local.tracing import (
    DEFAULT_PROTOCOL,
    ENDPOINT_ENV,
    PROTOCOL_ENV,
    SERVICE_ENV,
    open_provider,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

SERVICE = "splitwise-connector"  # unless OTEL_SERVICE_NAME names the engine
_PROPAGATOR = TraceContextTextMapPropagator()


class Traced(Protocol):
    """What the connector reads of a vLLM request (`vllm.v1.request.Request`)."""

    trace_headers: Mapping[str, str] | None


def request_traceparent(request: Traced) -> str | None:
    """The request's `traceparent`, if it came with one and the engine traces."""
    headers = request.trace_headers
    return headers.get("traceparent") if headers else None


class ConnectorTracer:
    """Records the connector's spans after the fact, each parented on a `traceparent`."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("splitwise_local.connector")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ConnectorTracer | None:
        """A tracer for the endpoint vLLM set for this process; None when it traces nowhere."""
        endpoint = environ.get(ENDPOINT_ENV)
        if not endpoint:
            return None
        protocol = environ.get(PROTOCOL_ENV, DEFAULT_PROTOCOL)
        service = environ.get(SERVICE_ENV, SERVICE)
        return cls(open_provider(service, endpoint, protocol, {"splitwise.component": "connector"}))

    def span(
        self,
        name: str,
        traceparent: str,
        start_ns: int,
        end_ns: int,
        attributes: Mapping[str, AttributeValue],
        failure: str | None = None,
    ) -> None:
        """One finished span, a child of `traceparent`; failed (status ERROR) when `failure`
        says why."""
        parent = _PROPAGATOR.extract({"traceparent": traceparent})
        span = self._tracer.start_span(
            name, parent, SpanKind.INTERNAL, attributes, start_time=start_ns
        )
        if failure is not None:
            span.set_attribute("splitwise.failure", failure)
            span.set_status(Status(StatusCode.ERROR, failure))
        span.end(end_ns)

    def close(self) -> None:
        """Exports the spans still queued, then stops."""
        self.provider.shutdown()
