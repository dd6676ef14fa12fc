"""OpenTelemetry export shared by the proxy and the connector: where spans go, and how.

Traces go over OTLP to one endpoint, in the protocol vLLM's own tracing reads from
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (grpc, its default, or http/protobuf), so the proxy, the
engines and our connector inside them all send to the same receiver. The proxy and the connector
each export through a tracer provider of their own, never the process's global one: inside an
engine vLLM installs its own global provider, and neither may replace the other's.

The SDK and its exporters are imported only when tracing is on (about 0.1 s, and the exporter
for grpc loads grpc): everything above `open_provider` is plain Python.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

TracesProtocol = Literal["grpc", "http/protobuf"]
PROTOCOLS: tuple[str, ...] = get_args(TracesProtocol)
DEFAULT_PROTOCOL: TracesProtocol = "grpc"  # vLLM's default
ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"  # vLLM sets it for its child processes
PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
SERVICE_ENV = "OTEL_SERVICE_NAME"
HTTP_TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for traces


def traces_endpoint(url: str, protocol: str) -> str:
    """`url` checked as an http(s)://host:port address; for http/protobuf, with OTLP's
    `/v1/traces` path when it has none (vLLM and the SDK post to the URL as given)."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s)://host:port URL")
    try:
        parts.port  # noqa: B018 - raises ValueError on a non-numeric or out-of-range port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown OTLP protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    if protocol == "http/protobuf" and parts.path in ("", "/"):
        return urlunsplit(parts._replace(path=HTTP_TRACES_PATH))
    return url


def open_provider(
    service: str, endpoint: str, protocol: str, attributes: dict[str, str] | None = None
) -> TracerProvider:
    """A tracer provider exporting in batches, off the caller's thread, to `endpoint`.

    Its sampler is the SDK's default (follow the caller's sampling decision, else sample all),
    which `OTEL_TRACES_SAMPLER` changes; `OTEL_BSP_*` tune the batches.
    """
    # Late: the SDK and exporters cost ~0.1 s to import, paid only where tracing is on.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporter: SpanExporter
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    elif protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as OTLPGrpcSpanExporter,
        )

        exporter = OTLPGrpcSpanExporter(endpoint=endpoint, insecure=True)
    else:
        raise ValueError(f"unknown OTLP protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    resource = Resource.create({SERVICE_NAME: service, **(attributes or {})})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider
