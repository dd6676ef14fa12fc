"""Whether the connector should call the store now: back off while it is down, retry after.

A store that died, or froze (SIGSTOP, a partition), must cost the engine nothing but cache
hits. Every store call of the connector is bounded by the client's socket deadline; when one
fails, the guard opens for a back-off (doubling from `first_backoff_s` up to `max_backoff_s`)
during which the connector does not call the store at all: requests compute their prompt and
saves are skipped. After the back-off the next call tries again; the store clients reconnect
on their own (a new connection, the restarted store's new shared-memory arena), so a store that
is back resumes hits with no engine restart. One log line marks each outage and each recovery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("splitwise_local.connector")

FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 4.0


class StoreDown(RuntimeError):
    """The store is not called now: it failed recently, or did not answer in time."""


class StoreGuard:
    """Open (skip the store) for a back-off after a failure; closed again after a success."""

    def __init__(
        self,
        where: str,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.where = where
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self._backoff = 0.0  # 0: the store is up
        self.outages = 0

    @property
    def down(self) -> bool:
        return self._backoff > 0

    def check(self) -> None:
        """Raises `StoreDown` while backing off."""
        with self._lock:
            if self._backoff and self._clock() < self._retry_at:
                raise StoreDown(
                    f"store unavailable, next try in {self._retry_at - self._clock():.1f} s"
                )

    def ok(self) -> None:
        with self._lock:
            was_down, self._backoff = self._backoff > 0, 0.0
        if was_down:
            logger.warning("splitwise %s: the store answers again", self.where)

    def failed(self, error: BaseException) -> None:
        with self._lock:
            first = self._backoff == 0
            self._backoff = min(self.max_backoff_s, (self._backoff * 2) or self.first_backoff_s)
            self._retry_at = self._clock() + self._backoff
            if first:
                self.outages += 1
        if first:
            logger.warning(
                "splitwise %s: store unavailable (%s); computing instead, retrying in %.1f s",
                self.where, error, self._backoff,
            )  # fmt: skip
