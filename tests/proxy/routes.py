"""Reading the proxy's routing decisions: the `x-splitwise-route` header and /metrics."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def route_of(reply: httpx.Response) -> dict[str, str]:
    """The `x-splitwise-route` header's fields: path, reason, policy, prompt_tokens, ..."""
    fields = (item.split("=", 1) for item in reply.headers["x-splitwise-route"].split("; "))
    return dict(fields)


def samples(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one metric on a /metrics page: (labels, value)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def routes_counted(url: str, policy: str, path: str, reason: str) -> float:
    """How many decisions the proxy at `url` counted with these labels."""
    wanted = {"policy": policy, "path": path, "reason": reason}
    return sum(v for labels, v in samples(url, "splitwise_proxy_routes_total") if labels == wanted)
