"""The engines' prompt-token counters, read every few seconds while a run goes on.

What the Mooncake phase judges is where each prompt token came from: computed, found in the
engine's own prefix cache, loaded from the store (vLLM's `vllm:prompt_tokens_by_source`), and
how many tokens the connectors saved because the store did not hold them yet
(`splitwise:saved_tokens`). Read around the run these give the totals; read every few seconds
they show how the hit ratio grows as the run fills the caches.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

POLL_S = 2.0
# Counter families read, by name without `_total`; a `source` label is kept apart.
FAMILIES = (
    "vllm:prompt_tokens_by_source",
    "vllm:prompt_tokens",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:external_prefix_cache_hits",
    "splitwise:saved_tokens",
    "splitwise:loaded_tokens",
    "splitwise:save_failures",
    "splitwise:save_dropped",
)


def read_counters(url: str, timeout: float = 10.0) -> dict[str, float] | None:
    """FAMILIES' values at `url` (a `source` label as `name{source}`), None if unreadable."""
    try:
        page = httpx.get(url, timeout=timeout).text
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(page):
            if family.name not in FAMILIES:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                source = sample.labels.get("source")
                key = f"{family.name}{{{source}}}" if source else family.name
                found[key] = found.get(key, 0.0) + sample.value
        return found
    except (httpx.HTTPError, ValueError):
        return None


class Recorder:
    """`with Recorder({name: url}, path): ...` reads every url every POLL_S seconds (and once at
    each end) and writes {"urls": ..., "samples": [{"t": s, "counters": {name: ...}}]} to
    `path`."""

    def __init__(self, urls: Mapping[str, str], path: Path, poll_s: float = POLL_S) -> None:
        self.urls = dict(urls)
        self.path = path
        self.poll_s = poll_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="timeline", daemon=True)
        self._started = 0.0

    def __enter__(self) -> Recorder:
        self._started = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"urls": self.urls, "samples": self.samples}) + "\n")

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._sample()

    def _sample(self) -> None:
        at = round(time.monotonic() - self._started, 3)
        counters = {name: read_counters(url) for name, url in self.urls.items()}
        self.samples.append({"t": at, "counters": counters})


def growth(samples: Sequence[dict[str, Any]], upto: int = -1) -> dict[str, dict[str, float]]:
    """Per component, each counter's growth from the first sample to sample `upto` (a
    component that did not answer both times is left out)."""
    if not samples:
        return {}
    first, last = samples[0]["counters"], samples[upto]["counters"]
    grown: dict[str, dict[str, float]] = {}
    for name, after in last.items():
        before = first.get(name)
        if after is not None and before is not None:
            grown[name] = {key: value - before.get(key, 0.0) for key, value in after.items()}
    return grown
