"""Reading a Prometheus /metrics page (the proxy's, the store's, a vLLM engine's) with
prometheus_client's own parser, for the benchmarks and tests that watch counters.

A sample is matched by its exact name as exposed (`vllm:external_prefix_cache_hits_total`,
`splitwise_component_up`), so a counter's `_created` sample never counts, and labels are
compared as parsed, not as text, so their order and escaping do not matter.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def samples(url: str, name: str, timeout: float = 10.0) -> list[tuple[dict[str, str], float]]:
    """Every sample named `name` on the /metrics page of the server at `url`: (labels, value)."""
    reply = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    reply.raise_for_status()
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
        if sample.name == name
    ]


def total(url: str, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when none does)."""
    return sum(value for found, value in samples(url, name) if labels.items() <= found.items())


def value(url: str, name: str, **labels: str) -> float | None:
    """The value of the sample named `name` whose labels include `labels`; None while the page
    has none (a gauge reads 0 only when it is there and says so, unlike `total`)."""
    found = [v for have, v in samples(url, name) if labels.items() <= have.items()]
    if len(found) > 1:
        raise ValueError(f"{len(found)} samples of {name} have the labels {labels}")
    return found[0] if found else None
