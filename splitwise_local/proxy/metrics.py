"""The proxy's Prometheus metrics, in a registry of its own.

Each app gets its own `CollectorRegistry`, so several proxies in one process (tests, the
launcher) never clash over metric names. Per-engine numbers are read from the pools, and each
role's admission queue from admission.py, when scraped rather than mirrored into gauges, so they
cannot drift from what the pools and the admission decide on.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitwise_local.proxy.admission import RoleQueue
from splitwise_local.proxy.pool import EnginePool
from splitwise_local.proxy.tracing import UNTRACED, Untraced

# From a cached prompt's millisecond prefill to a long CPU generation's minutes.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip


class EngineCollector(Collector):
    """Per-engine requests, failures, in-flight count and up/down state, read at scrape time."""

    def __init__(self, pools: Iterable[EnginePool]) -> None:
        self._pools = list(pools)

    def collect(self) -> Iterator[Metric]:
        """Read from the pools at scrape time, so no counter has to be kept in step with them."""
        labels = ["role", "engine"]
        requests = CounterMetricFamily(
            "splitwise_proxy_engine_requests", "Requests sent to each engine", labels=labels
        )
        failures = CounterMetricFamily(
            "splitwise_proxy_engine_failures",
            "Failures that marked an engine down",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "splitwise_proxy_engine_in_flight", "Requests in flight on each engine", labels=labels
        )
        up = GaugeMetricFamily(
            "splitwise_proxy_engine_up", "1 while an engine is in rotation", labels=labels
        )
        pending = GaugeMetricFamily(
            "splitwise_proxy_engine_pending_tokens",
            "Prompt tokens sent to each engine that it has not answered yet",
            labels=labels,
        )
        for pool in self._pools:
            for endpoint in pool.endpoints:
                values = [pool.role, endpoint.url]
                requests.add_metric(values, endpoint.requests)
                failures.add_metric(values, endpoint.failures)
                in_flight.add_metric(values, endpoint.in_flight)
                up.add_metric(values, float(pool.is_up(endpoint)))
                pending.add_metric(values, endpoint.pending_tokens)
        yield from (requests, failures, in_flight, up, pending)


class AdmissionCollector(Collector):
    """Per-role admission: refusals, queued prompt tokens, the bound and the measured rate."""

    def __init__(self, queues: Iterable[RoleQueue]) -> None:
        self._queues = list(queues)

    def collect(self) -> Iterator[Metric]:
        """Read from the queues at scrape time."""
        refused = CounterMetricFamily(
            "splitwise_proxy_admission_refused",
            "Requests refused (429) because their role had too many prompt tokens queued",
            labels=["role"],
        )
        queued = GaugeMetricFamily(
            "splitwise_proxy_admission_queued_tokens",
            "Prompt tokens admitted to each role that its engines have not answered yet",
            labels=["role"],
        )
        bound = GaugeMetricFamily(
            "splitwise_proxy_admission_bound_tokens",
            "The most prompt tokens each role queues before refusing (when admission is on)",
            labels=["role"],
        )
        rate = GaugeMetricFamily(
            "splitwise_proxy_admission_cleared_tokens_per_second",
            "Prompt tokens each role answers per second while it has tokens queued (measured)",
            labels=["role"],
        )
        for queue in self._queues:
            refused.add_metric([queue.role], queue.refused)
            queued.add_metric([queue.role], queue.queued)
            bound.add_metric([queue.role], queue.bound)
            if queue.rate.per_s is not None:
                rate.add_metric([queue.role], queue.rate.per_s)
        yield from (refused, queued, bound, rate)


class ProxyMetrics:
    """Request counts, errors by kind, prefill time, decode time to first byte, latency, and
    the engines' and the admission queues' state."""

    def __init__(self, pools: Iterable[EnginePool], queues: Iterable[RoleQueue]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "splitwise_proxy_requests",
            "Requests answered, by route and HTTP status",
            ["route", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "splitwise_proxy_errors",
            "Failures by kind (e.g. prefill_timeout, decode_unreachable, body_too_large)",
            ["kind"],
            registry=self.registry,
        )
        self.prefill_fallbacks = Counter(
            "splitwise_proxy_prefill_fallbacks",
            "Requests sent to decode alone because prefill failed",
            registry=self.registry,
        )
        self.decode_fallbacks = Counter(
            "splitwise_proxy_decode_fallbacks",
            "Requests served whole by a prefill engine because no decode engine was reachable",
            registry=self.registry,
        )
        self.routes = Counter(
            "splitwise_proxy_routes",
            "Routing decisions by disagg policy, path (disaggregated: prefill then decode; "
            "direct: decode alone) and reason",
            ["policy", "path", "reason"],
            registry=self.registry,
        )
        self.prefill_seconds = Histogram(
            "splitwise_proxy_prefill_seconds",
            "Successful prefill requests, by engine",
            ["engine"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decode_ttft_seconds = Histogram(
            "splitwise_proxy_decode_ttft_seconds",
            "Decode request sent to first body bytes received (whole answers: the whole body)",
            ["engine"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "splitwise_proxy_request_seconds",
            "End-to-end latency as the proxy sees it, to the last byte sent",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "splitwise_proxy_in_flight_requests",
            "Caller requests being answered",
            registry=self.registry,
        )
        self.registry.register(EngineCollector(pools))
        self.registry.register(AdmissionCollector(queues))

    def start(self, route: str, trace: Untraced = UNTRACED) -> RequestRecord:
        """Counts a caller's request in flight until its record is finished (which ends its
        trace's span too)."""
        return RequestRecord(self, route, trace)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestRecord:
    """One caller request's accounting; `finish` may be called more than once, counts once.

    A streamed answer outlives its route handler, so whoever sends the last byte finishes it.
    """

    def __init__(self, metrics: ProxyMetrics, route: str, trace: Untraced = UNTRACED) -> None:
        self.trace = trace
        self._metrics = metrics
        self._route = route
        self._started = time.perf_counter()
        self._finished = False
        metrics.in_flight.inc()

    def finish(self, status: int) -> None:
        """Counts the request once, by status, with its latency; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        self._metrics.in_flight.dec()
        self._metrics.requests.labels(self._route, str(status)).inc()
        self._metrics.request_seconds.labels(self._route).observe(
            time.perf_counter() - self._started
        )
        self.trace.finish(status)
