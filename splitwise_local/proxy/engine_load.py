"""What routing knows of the engines beyond its own counts: how long each takes per prompt
token (`PrefillCost`, learned from its answers) and how many requests a vLLM engine runs
(`EngineRequests`, asked of the engine itself, which also sees requests the proxy did not send).

`PrefillCost` keeps, per engine, the seconds per computed prompt token of its last answers: a
prefill engine's whole answer (one token), a decode engine's first streamed event when it
computed the prompt itself. That time includes what a request costs besides its tokens (the
engine's own step, HTTP, waiting behind other prompts), so the estimate errs high, which errs
toward sparing running streams. Answers that computed few tokens say more about those fixed
costs than about the tokens and are not used; the median of the last samples ignores the odd
answer served from a prefix cache the proxy did not know of.
"""

from __future__ import annotations

import statistics
from collections import deque

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

SAMPLES = 16  # answers remembered per engine
MIN_SAMPLE_TOKENS = 64  # fewer computed tokens: the fixed costs would dominate the sample
# vLLM's gauges of the requests an engine runs and queues (both wait on its steps), as their
# samples' lines begin (not `vllm:num_requests_waiting_by_reason`, which splits the second).
REQUEST_GAUGES = tuple(
    f"{name}{after}"
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting")
    for after in ("{", " ")
)


class PrefillCost:
    """Seconds per prompt token each engine took lately; for an engine never measured, what the
    others took (same model, same kind of hardware: the better guess than none)."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[float]] = {}

    def learn(self, engine: str, tokens: int, seconds: float) -> None:
        """`engine` computed `tokens` prompt tokens and answered after `seconds`."""
        if tokens < MIN_SAMPLE_TOKENS or seconds <= 0:
            return
        self._samples.setdefault(engine, deque(maxlen=SAMPLES)).append(seconds / tokens)

    def per_token_s(self, engine: str) -> float | None:
        """The median of `engine`'s samples, else of every engine's; None before any answer."""
        own = self._samples.get(engine)
        if own:
            return statistics.median(own)
        every = [sample for samples in self._samples.values() for sample in samples]
        return statistics.median(every) if every else None


class EngineRequests:
    """The requests a vLLM engine runs or queues, read from its `/metrics` when routing needs
    them; None when it does not say (not vLLM, no answer in time)."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def count(self, url: str) -> int | None:
        """Running plus waiting requests at `url`."""
        if self._session is None:  # made on first use: it belongs to the running event loop
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(url + "/metrics") as answer:
                if answer.status != 200:
                    return None
                page = await answer.text()
        except (TimeoutError, aiohttp.ClientError):
            return None
        return requests_in(page)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def requests_in(page: str) -> int | None:
    """The sum of vLLM's running and waiting gauges on a Prometheus page; None without them."""
    lines = [line for line in page.splitlines() if line.startswith(REQUEST_GAUGES)]
    if not lines:
        return None
    samples = (
        s for f in text_string_to_metric_families("\n".join(lines) + "\n") for s in f.samples
    )
    return round(sum(sample.value for sample in samples))
