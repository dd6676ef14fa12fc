"""Reading a Prometheus /metrics page (the proxy's, the store's, a vLLM engine's) with
prometheus_client's own parser, for the benchmarks and tests that watch counters.

A sample is matched by its exact name as exposed (`vllm:external_prefix_cache_hits_total`,
`splitwise_component_up`), so a counter's `_created` sample never counts, and labels are
compared as parsed, not as text, so their order and escaping do not matter.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Page = list[Sample]


def read_page(url: str, timeout: float = 10.0) -> Page:
    """Every sample of the /metrics page of the server at `url`, read once: what several
    questions about one moment must share (a component's state and its restart count)."""
    reply = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout)
    reply.raise_for_status()
    return [
        sample for family in text_string_to_metric_families(reply.text) for sample in family.samples
    ]


def samples(source: str | Page, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample named `name` on a page (read now from the server at `source` if it is a
    URL): (labels, value)."""
    page = read_page(source) if isinstance(source, str) else source
    return [(sample.labels, sample.value) for sample in page if sample.name == name]


def total(source: str | Page, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 when none does)."""
    return sum(value for found, value in samples(source, name) if labels.items() <= found.items())


def value(source: str | Page, name: str, **labels: str) -> float | None:
    """The value of the sample named `name` whose labels include `labels`; None while the page
    has none (a gauge reads 0 only when it is there and says so, unlike `total`)."""
    found = [v for have, v in samples(source, name) if labels.items() <= have.items()]
    if len(found) > 1:
        raise ValueError(f"{len(found)} samples of {name} have the labels {labels}")
    return found[0] if found else None
