"""The engines of one role: which to send the next request to, and which are down.

Picking is least-loaded by default (`least_loaded`): the endpoint with the fewest requests in
flight, then the fewest prompt tokens it still has to compute (`pending_tokens`), ties broken by
whoever was picked longest ago, which is round robin while the load is even; the router
(routing.py) may pass its own ranking instead, over the same state. An engine that fails is
marked down for a back-off period that doubles with each consecutive failure (capped); once the
period ends the next request tries it again, and a success or a passing health check clears it.
No background prober: an idle proxy does not need to know, and `/health` probes on demand.

Whoever supervises the engines (the launcher) may know more than failed requests tell: it says
when an engine died (`mark_dead`) and when it serves again (`mark_alive`); in between the
engine is out of rotation whatever its back-off says, so no request is sent to it at all.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Literal

import aiohttp

log = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]


@dataclass(eq=False)
class Endpoint:
    """One engine's URL and what the proxy knows about it right now."""

    url: str
    role: Role
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    down_until: float = 0.0
    last_error: str | None = None
    last_pick: int = 0
    dead: str | None = None  # why its supervisor says it is gone, until it says it is back
    pending_tokens: int = 0  # prompt tokens sent to it that it has not answered yet

    def available(self, now: float) -> bool:
        """Whether a request may go to it now: not dead, not in back-off."""
        return self.dead is None and now >= self.down_until


# Orders a role's engines for one request: the lowest key is picked.
Rank = Callable[[Endpoint], tuple[int, ...]]


def least_loaded(endpoint: Endpoint) -> tuple[int, ...]:
    """Fewest requests in flight, then fewest prompt tokens pending, then picked longest ago."""
    return (endpoint.in_flight, endpoint.pending_tokens, endpoint.last_pick)


class EnginePool:
    """Least-loaded selection with round-robin ties, and mark-down with exponential back-off."""

    def __init__(
        self,
        role: Role,
        urls: list[str],
        backoff_initial_s: float,
        backoff_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.role = role
        self.endpoints = [Endpoint(url, role) for url in urls]
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._clock = clock
        self._picks = itertools.count(1)

    def acquire(
        self, exclude: Container[Endpoint] = (), rank: Rank | None = None, tokens: int = 0
    ) -> Endpoint | None:
        """Picks the available endpoint that ranks lowest (default: `least_loaded`), counts a
        request and `tokens` pending on it; None if none is."""
        now = self._clock()
        candidates = [e for e in self.endpoints if e not in exclude and e.available(now)]
        if not candidates:
            return None
        chosen = min(candidates, key=rank or least_loaded)
        chosen.last_pick = next(self._picks)
        chosen.in_flight += 1
        chosen.requests += 1
        chosen.pending_tokens += tokens
        return chosen

    def release(self, endpoint: Endpoint) -> None:
        """The request sent to it has ended, answered or not."""
        endpoint.in_flight -= 1

    def find(self, url: str) -> Endpoint | None:
        """The pool's endpoint at `url`, if it has one."""
        return next((e for e in self.endpoints if e.url == url), None)

    def any_available(self) -> bool:
        """Whether any endpoint could take a request now (else: fall back, or 503)."""
        now = self._clock()
        return any(e.available(now) for e in self.endpoints)

    def computed(self, endpoint: Endpoint, tokens: int) -> None:
        """`tokens` acquired with a request are computed (or will never be)."""
        endpoint.pending_tokens -= tokens

    def mark_down(self, endpoint: Endpoint, reason: str) -> None:
        """Takes the endpoint out of rotation for the next back-off period."""
        endpoint.failures += 1
        endpoint.consecutive_failures += 1
        exponent = min(endpoint.consecutive_failures - 1, 32)
        backoff = min(self._backoff_initial_s * 2**exponent, self._backoff_max_s)
        endpoint.down_until = self._clock() + backoff
        endpoint.last_error = reason
        log.warning("%s engine %s down for %.1fs: %s", self.role, endpoint.url, backoff, reason)

    def mark_up(self, endpoint: Endpoint) -> None:
        """It answered: failures and back-off forgotten."""
        if endpoint.consecutive_failures:
            log.info("%s engine %s is back", self.role, endpoint.url)
        endpoint.consecutive_failures = 0
        endpoint.down_until = 0.0
        endpoint.last_error = None

    def mark_dead(self, endpoint: Endpoint, cause: str) -> None:
        """Out of rotation until `mark_alive`: its supervisor saw it die or freeze."""
        endpoint.dead = cause
        endpoint.last_error = cause
        log.warning("%s engine %s died: %s", self.role, endpoint.url, cause)

    def mark_alive(self, endpoint: Endpoint) -> None:
        """Its supervisor restarted it: back in rotation at once, back-off forgotten."""
        endpoint.dead = None
        self.mark_up(endpoint)
        log.info("%s engine %s serves again", self.role, endpoint.url)

    def is_up(self, endpoint: Endpoint) -> bool:
        """In rotation now: alive by its supervisor's word and not in back-off."""
        return endpoint.available(self._clock())

    async def probe(self, session: aiohttp.ClientSession, timeout_s: float) -> dict[str, bool]:
        """GETs every engine's `/health` at once, updates their state; {url: up}."""
        limit = aiohttp.ClientTimeout(total=timeout_s)

        async def check(endpoint: Endpoint) -> bool:
            if endpoint.dead is not None:  # its supervisor's word stands until it is back
                return False
            try:
                async with session.get(endpoint.url + "/health", timeout=limit) as response:
                    status = response.status
            except (TimeoutError, aiohttp.ClientError) as exc:
                reason = f"health check failed: {type(exc).__name__}"
            else:
                if status == 200:
                    self.mark_up(endpoint)
                    return True
                reason = f"health check answered {status}"
            self.mark_down(endpoint, reason)
            return False

        results = await asyncio.gather(*(check(e) for e in self.endpoints))
        return {e.url: up for e, up in zip(self.endpoints, results, strict=True)}
