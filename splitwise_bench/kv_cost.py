"""The cost side of disaggregation: KV bytes moved and transfer time, from counters around a run.

The load generator reads the KV store's `stats()` and the Prometheus `/metrics` of the engines
or the proxy once before and once after its requests, and reports the differences per request.
Both sources are optional and best effort: a store or endpoint that cannot be read is reported
with the reason and never fails the run, because the latency numbers stand on their own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from splitwise_local.store.backend import open_backend

# Counters and histograms whose names match this are the transfer-related ones: the connector's
# own, vLLM's prefix-cache hits (external = loaded from the store), the proxy's prefill time.
DEFAULT_METRICS_PATTERN = r"kv|connector|prefix_cache|splitwise|prefill"
MONOTONIC_SUFFIXES = ("_total", "_sum", "_count")


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"}


def read_store_stats(url: str) -> dict[str, Any]:
    """The store's stats at `url`, or {"error": ...} when it cannot be reached."""
    try:
        backend = open_backend(url)
        try:
            return dict(backend.stats())
        finally:
            backend.close()
    except Exception as exc:  # any failure of an optional probe is a finding, not a crash
        return _error(exc)


def read_metrics(url: str, pattern: str = DEFAULT_METRICS_PATTERN) -> dict[str, Any]:
    """Monotonic Prometheus samples (counters, histogram sums and counts) whose name matches
    `pattern`, summed over their labels; or {"error": ...}."""
    try:
        response = httpx.get(url, timeout=10.0)
        response.raise_for_status()
        wanted = re.compile(pattern)
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            if family.type not in ("counter", "histogram") or not wanted.search(family.name):
                continue
            for sample in family.samples:
                if sample.name.endswith(MONOTONIC_SUFFIXES):
                    samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
        return samples
    except (httpx.HTTPError, ValueError) as exc:
        return _error(exc)


def snapshot(store_url: str | None, metrics_urls: Sequence[str]) -> dict[str, Any]:
    """Everything readable now, keyed by source."""
    return {
        "store": read_store_stats(store_url) if store_url else None,
        "metrics": {url: read_metrics(url) for url in metrics_urls},
    }


def _numeric(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _difference(before: Mapping[str, Any], after: Mapping[str, Any], requests: int) -> dict:
    if "error" in before or "error" in after:
        return {"error": after.get("error") or before.get("error")}
    old, new = _numeric(before), _numeric(after)
    delta = {k: new[k] - old.get(k, 0.0) for k in new}
    result: dict[str, Any] = {"delta": delta}
    if requests:
        result["per_request"] = {k: v / requests for k, v in delta.items()}
    # Histogram pairs give a mean per observation: e.g. seconds per KV load.
    means = {
        name[: -len("_sum")]: value / delta[name[: -len("_sum")] + "_count"]
        for name, value in delta.items()
        if name.endswith("_sum") and delta.get(name[: -len("_sum")] + "_count")
    }
    if means:
        result["mean_per_observation"] = means
    return result


def compare(before: dict[str, Any], after: dict[str, Any], requests: int) -> dict[str, Any]:
    """Per-source differences between two snapshots, per request where `requests` > 0.

    `kv_bytes_per_request` is the growth of the store's held bytes divided by the requests: the
    KV the prefill side put, exact while the store evicted nothing during the run.
    """
    report: dict[str, Any] = {}
    if before["store"] is not None:
        store = _difference(before["store"], after["store"], requests)
        report["store"] = store
        evicted = store.get("delta", {}).get("evictions", 0)
        if "bytes" in store.get("delta", {}) and requests:
            report["kv_bytes_per_request"] = store["delta"]["bytes"] / requests
            report["kv_bytes_exact"] = not evicted
    if before["metrics"]:
        report["metrics"] = {
            url: _difference(before["metrics"][url], after["metrics"][url], requests)
            for url in before["metrics"]
        }
    return report
