"""A small OTLP/HTTP traces receiver, for tests and `bench proxy --tracing`.

No OpenTelemetry collector ships as a Debian or PyPI package, so this is the receiving end of
OTLP over HTTP as the SDK's exporters speak it: `POST /v1/traces` with a protobuf
`ExportTraceServiceRequest` (gzip-compressed or not), answered with an empty
`ExportTraceServiceResponse`. Spans are decoded with the OpenTelemetry project's own protobuf
classes (`opentelemetry-proto`) and kept in memory as `ReceivedSpan`s; `GET /stats` counts them.

`python -m splitwise_testing.otlp_receiver --port 4318` runs one in its own process (it then
keeps counts only, not the spans).
"""

from __future__ import annotations

import argparse
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as received: its service, ids (hex), times (ns since the epoch), attributes."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    error: str | None  # the status message of a span whose status is ERROR

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def decode(body: bytes) -> list[ReceivedSpan]:
    """The spans of one `ExportTraceServiceRequest`."""
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                failed = span.status.code == Status.STATUS_CODE_ERROR
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        attributes=_attributes(span.attributes),
                        error=span.status.message if failed else None,
                    )
                )
    return spans


class OtlpReceiver:
    """OTLP/HTTP on 127.0.0.1 (port 0: a free one), served by threads until `stop`."""

    def __init__(self, port: int = 0, keep: bool = True) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._spans: list[ReceivedSpan] = []
        self.received = 0  # spans, kept or not
        self.exports = 0  # requests
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self.serve, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """The URL for `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` with the http/protobuf protocol."""
        return f"http://127.0.0.1:{self.port}{TRACES_PATH}"

    def start(self) -> OtlpReceiver:
        """Serves in a thread of its own."""
        self._thread.start()
        return self

    def serve(self) -> None:
        """Serves in this thread until `stop`."""
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float
    ) -> list[ReceivedSpan]:
        """The spans once `done(spans)` holds; after `timeout` seconds, whatever has come."""
        deadline = time.monotonic() + timeout
        while not done(spans := self.spans()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return spans

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.exports += 1
            self.received += len(spans)
            if self.keep:
                self._spans.extend(spans)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != TRACES_PATH:
                    self._answer(404, b"", "text/plain")
                    return
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                try:
                    spans = decode(body)
                except Exception as exc:  # not an ExportTraceServiceRequest
                    self._answer(400, str(exc).encode(), "text/plain")
                    return
                receiver._add(spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self._answer(200, answer, "application/x-protobuf")

            def do_GET(self) -> None:
                if self.path != "/stats":
                    self._answer(404, b"", "text/plain")
                    return
                stats = {"spans": receiver.received, "exports": receiver.exports}
                self._answer(200, json.dumps(stats).encode(), "application/json")

            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: one line per export would drown a benchmark's output."""

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    receiver = OtlpReceiver(args.port, keep=False)
    print(f"OTLP/HTTP receiver on {receiver.endpoint}", flush=True)
    receiver.serve()


if __name__ == "__main__":
    main()
