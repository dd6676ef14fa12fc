"""Reading the proxy's routing decisions: the `x-splitwise-route` header and /metrics."""

from __future__ import annotations

import httpx

from splitwise_local.bench.scrape import total


def route_of(reply: httpx.Response) -> dict[str, str]:
    """The `x-splitwise-route` header's fields: path, reason, policy, prompt_tokens, ..."""
    fields = (item.split("=", 1) for item in reply.headers["x-splitwise-route"].split("; "))
    return dict(fields)


def routes_counted(url: str, policy: str, path: str, reason: str) -> float:
    """How many decisions the proxy at `url` counted with these labels."""
    labels = {"policy": policy, "path": path, "reason": reason}
    return total(url, "splitwise_proxy_routes_total", **labels)
