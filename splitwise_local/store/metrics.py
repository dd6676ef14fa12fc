"""The store's numbers for Prometheus: `/metrics` in its text format, on an HTTP port of its own.

The store's own wire protocol already answers STATS, but only to its clients; Prometheus (and
so every dashboard) needs an HTTP page. The numbers are read from the index and the server when
scraped, never mirrored, so the page cannot drift from what the store decides on. Every counter
carries the protocol whose clients caused it (`splitwise`: ours, `lmcache`: LMCache's), so one
can see, say, that LMCache's gets miss while ours hit; the `splitwise_store_tier_*` families
carry the tier (`dram`, and `disk` when the store has one) that held or served a value.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "splitwise_store_"
# Index counter -> (metric name without _total, help). Prometheus adds `_total` to counters.
COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("hits", "Values asked for (get) and found"),
    "misses": ("misses", "Values asked for (get) and absent"),
    "lookup_hits": ("lookup_hits", "Keys an exists query found"),
    "lookup_misses": ("lookup_misses", "Exists queries that stopped at an absent key"),
    "puts": ("puts", "Values stored"),
    "refused": ("rejected_puts", "Puts rejected: larger than the largest value, or no room"),
    "aborted": ("aborted_puts", "Puts begun and never completed (the writer failed or left)"),
    "evictions": ("evictions", "Values evicted (least recently used) to make room"),
    "bytes_written": ("written_bytes", "Bytes of values stored"),
    "bytes_read": ("read_bytes", "Bytes of values handed to readers"),
}
GAUGES: dict[str, tuple[str, str]] = {
    "items": ("items", "Values held now, by the protocol that wrote them"),
    "bytes": ("held_bytes", "Bytes of values held now, by the protocol that wrote them"),
}

# Store-wide numbers (one arena for every protocol): STATS key -> (metric name, help).
SIZES: dict[str, tuple[str, str]] = {
    "capacity": ("capacity_bytes", "Bytes of values the store may hold before it evicts"),
    "used_bytes": ("used_bytes", "Bytes of arena pages in use (values rounded up to pages)"),
    "max_value": ("max_value_bytes", "The largest value the store takes, in bytes"),
    "arena_resident_bytes": ("arena_resident_bytes", "Bytes of the arena backed by RAM now"),
    "pinned": ("pinned_items", "Values being read now (eviction skips them)"),
    "pending": ("pending_items", "Values being written now (not yet visible)"),
}


# Each tier's numbers (STATS `tiers`): key -> (metric name without _total, help).
TIER_COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("tier_hits", "Values asked of this tier and found in it"),
    "misses": ("tier_misses", "Values asked of this tier and absent (the next tier is asked)"),
    "writes": ("tier_writes", "Values written into this tier (DRAM: puts and promotions)"),
    "evictions": ("tier_evictions", "Values evicted from this tier to keep it within its cap"),
    "errors": ("tier_errors", "DRAM: puts refused; disk: failed writes, corrupt or lost files"),
}
TIER_GAUGES: dict[str, tuple[str, str]] = {
    "items": ("tier_items", "Values held in this tier now"),
    "bytes": ("tier_bytes", "Bytes held in this tier now (disk: whole files)"),
    "capacity": ("tier_capacity_bytes", "Bytes this tier may hold"),
}
# The disk tier's own: STATS tiers.disk key -> (metric name, help, counter or not).
DISK: dict[str, tuple[str, str, bool]] = {
    "skipped": ("disk_skipped", "Values never written to disk: left DRAM first, or too big", True),
    "dropped": ("disk_dropped", "Files deleted at start: unfinished, torn or outdated", True),
    "queued": ("disk_queued_items", "Values waiting for the disk writer or being written", False),
}


class StoreCollector(Collector):
    """Builds the metric families from one `stats()` call per scrape (index and server
    numbers merged, as the STATS answer has them)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        shares: dict[str, dict[str, int]] = stats["protocols"]
        for field, (name, text) in COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, text, labels=["protocol"])
            for protocol, share in shares.items():
                family.add_metric([protocol], share[field])
            yield family
        for field, (name, text) in GAUGES.items():
            gauge = GaugeMetricFamily(PREFIX + name, text, labels=["protocol"])
            for protocol, share in shares.items():
                gauge.add_metric([protocol], share[field])
            yield gauge
        connections = GaugeMetricFamily(
            PREFIX + "connections", "Client connections open now", labels=["protocol"]
        )
        accepted = CounterMetricFamily(
            PREFIX + "connections_accepted", "Client connections accepted", labels=["protocol"]
        )
        for protocol, count in stats["connections_by_protocol"].items():
            connections.add_metric([protocol], count)
            accepted.add_metric([protocol], stats["accepted_by_protocol"][protocol])
        yield from (connections, accepted)
        yield GaugeMetricFamily(
            PREFIX + "connections_unauthenticated",
            "Connections open now that have not yet authenticated",
            stats["connections_unauthenticated"],
        )
        yield CounterMetricFamily(
            PREFIX + "connections_refused",
            "Connections refused at the connection caps (answered BUSY)",
            stats["refused_connections"],
        )
        for key, (name, text) in SIZES.items():
            yield GaugeMetricFamily(PREFIX + name, text, stats[key])
        yield from self._tiers(stats["tiers"])

    @staticmethod
    def _tiers(tiers: dict[str, dict[str, Any]]) -> Iterator[Metric]:
        kinds = [(TIER_COUNTERS, CounterMetricFamily), (TIER_GAUGES, GaugeMetricFamily)]
        for table, kind in kinds:
            for field, (name, text) in table.items():
                family = kind(PREFIX + name, text, labels=["tier"])
                for tier, numbers in tiers.items():
                    family.add_metric([tier], numbers[field])
                yield family
        disk = tiers.get("disk")
        if disk is not None:
            for field, (name, text, counter) in DISK.items():
                yield (CounterMetricFamily if counter else GaugeMetricFamily)(
                    PREFIX + name, text, disk[field]
                )


class MetricsServer:
    """prometheus-client's HTTP server for one collector, in a daemon thread."""

    def __init__(self, stats: Callable[[], dict[str, Any]], host: str, port: int) -> None:
        registry = CollectorRegistry()
        registry.register(StoreCollector(stats))
        self._httpd: WSGIServer
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port = self._httpd.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
