"""The connector's counters, on vLLM's own metrics path: each engine's /metrics and its log.

Worker and scheduler sides add to a `Counters` as requests load and save; vLLM collects a
`SplitwiseStats` from both every step (`get_kv_connector_stats`), sums them across workers,
ships them to the API server process and hands them to the connector class's
`build_kv_connector_stats` (for the periodic "KV Transfer metrics" log line) and to the
`SplitwisePromMetrics` that `build_prom_metrics` registered, which adds them to Prometheus
counters named `splitwise:<counter>_total`, labelled like vLLM's own (model_name, engine).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)
from vllm.v1.metrics.utils import create_metric_per_engine

if TYPE_CHECKING:
    from vllm.config import VllmConfig

COUNTERS: dict[str, str] = {
    "loads": "Requests whose prompt KV the connector loaded (fully or in part)",
    "loaded_tokens": "Prompt tokens whose KV was loaded from the store",
    "loaded_bytes": "Bytes of KV chunks read from the store for loads",
    "load_seconds": "Seconds spent fetching, checking and writing loaded KV",
    "load_failures": "Loads that stopped early (missing or corrupt chunk, store down)",
    "saves": "Requests with KV chunks saved to the store",
    "saved_tokens": "Prompt tokens whose KV was saved to the store",
    "saved_bytes": "Bytes of KV chunks written to the store",
    "save_seconds": "Seconds spent gathering, encoding and writing saved KV",
    "save_failures": "Chunks that could not be saved (store down, full, too slow)",
    "save_dropped": "Chunks not saved because the save queue was full (saves never wait)",
    "save_late": "Answers a producer sent before their prompt's chunks were stored",
    "store_unavailable": "Requests that computed their prompt because the store was down",
}


class Counters:
    """Thread-safe sums since the last `take`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(COUNTERS, 0.0)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                self._values[name] += amount

    def take(self) -> SplitwiseStats | None:
        """The sums as vLLM's stats object (None when nothing happened), and a fresh start."""
        with self._lock:
            values, self._values = self._values, dict.fromkeys(COUNTERS, 0.0)
        return SplitwiseStats(values) if any(values.values()) else None


@dataclass
class SplitwiseStats(KVConnectorStats):
    """Counter increments of one interval, summed across workers and the scheduler."""

    data: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0.0))

    def reset(self) -> None:
        self.data = dict.fromkeys(COUNTERS, 0.0)

    def aggregate(self, other: KVConnectorStats) -> SplitwiseStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0.0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return {name: round(value, 3) for name, value in self.data.items() if value}

    def is_empty(self) -> bool:
        return not any(self.data.values())


def _unregister_ours() -> None:
    """vLLM re-creates its stat loggers (and unregisters its own `vllm:` metrics first); do the
    same for ours, or a second registration would fail as a duplicate."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", "").startswith("splitwise:"):
            REGISTRY.unregister(collector)


class SplitwisePromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per entry of `COUNTERS`, per engine."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_ours()
        self.counters = {
            name: create_metric_per_engine(
                self._counter_cls(
                    name=f"splitwise:{name}", documentation=text, labelnames=labelnames
                ),
                per_engine_labelvalues,
            )
            for name, text in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            if name in self.counters and value:
                # vLLM types every metric as Gauge | Counter | Histogram; these are counters.
                self.counters[name][engine_idx].inc(value)  # type: ignore[union-attr]
