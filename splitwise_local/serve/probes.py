"""The readiness and health checks of the launcher's children: each answers True once the
component serves, and the supervisor keeps asking while it runs."""

from __future__ import annotations

import httpx

from splitwise_local.config import SplitwiseConfig
from splitwise_local.serve.supervisor import Unhealthy
from splitwise_local.store.backend import open_backend


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """GET `url` answers 200."""
    return httpx.get(url, timeout=timeout).status_code == 200


def engine_healthy(url: str) -> bool:
    """vLLM's /health: 200 while serving; 503 once its engine core has died, which the
    supervisor takes as a death at once (the API server itself exits only seconds later)."""
    status = httpx.get(url, timeout=2.0).status_code
    if status == 503:
        raise Unhealthy(f"GET {url} answered 503: its engine core is gone")
    return status == 200


def store_responds(url: str, config: SplitwiseConfig) -> bool:
    """A client of the store connects and `stats()` answers."""
    backend = open_backend(url, config)
    try:
        backend.stats()
    finally:
        backend.close()
    return True
