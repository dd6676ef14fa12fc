"""Scheduler side: the store's prefix queries, asked off the scheduler's thread.

vLLM calls `get_num_new_matched_tokens` inside its scheduling loop, so a slow or frozen store
there would stall every running request. The query goes to a thread instead; the scheduler
waits for it at most `WAIT_S` (about what a shared-memory query takes, so usually the answer
is in at once), and otherwise gets None ("ask again next step", vLLM's own protocol) until the
answer arrives or `DEADLINE_S` has passed, when the request computes its prompt instead. The
deadline is long enough for a healthy store on a starved CPU (two engines busy on two cores)
and short against computing a long prompt on a CPU.

When the store lacks a chunk but holds later ones (an eviction or a failed save punched a
hole in the prompt), one more query says so, for the warning that explains the short hit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import NamedTuple

from splitwise_local.connector.health import StoreDown, StoreGuard

WAIT_S = 0.002
DEADLINE_S = 2.0


class Lookup(NamedTuple):
    present: int  # keys held, from the first
    hole: bool  # a missing key is followed by held ones


class StoreLookups:
    """`lookups(req_id, keys)`: the `Lookup` for a prompt's keys, or None while it is asked.

    `keys` are `stride` per chunk (one per rank); a hole is looked for chunk by chunk.
    """

    def __init__(
        self,
        exists: Callable[[Sequence[str]], int],
        guard: StoreGuard,
        *,
        stride: int = 1,
        wait_s: float = WAIT_S,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self._exists = exists
        self.guard = guard
        self.stride = stride
        self.wait_s = wait_s
        self.deadline_s = deadline_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitwise-lookup")
        self._pending: dict[str, tuple[Future[Lookup], float]] = {}
        self._answers: dict[str, Lookup] = {}

    def __call__(self, req_id: str, keys: Sequence[str]) -> Lookup | None:
        """Raises `StoreDown` when the store cannot answer (down, failed, or too slow)."""
        if req_id in self._answers:
            return self._answers[req_id]
        if req_id not in self._pending:
            self.guard.check()
            self._pending[req_id] = (self._executor.submit(self._query, keys), time.monotonic())
        future, started = self._pending[req_id]
        try:
            present = future.result(timeout=self.wait_s)
        except FutureTimeout:
            if time.monotonic() - started < self.deadline_s:
                return None
            del self._pending[req_id]
            error = TimeoutError(f"no answer within {self.deadline_s} s")
            self.guard.failed(error)
            raise StoreDown(str(error)) from None
        except Exception as exc:  # the store's errors, already reported to the guard
            del self._pending[req_id]
            raise StoreDown(str(exc)) from exc
        del self._pending[req_id]
        self._answers[req_id] = present
        return present

    def _query(self, keys: Sequence[str]) -> Lookup:
        try:
            present = self._exists(keys)
            after = (present // self.stride + 1) * self.stride  # past the first missing chunk
            hole = after < len(keys) and self._exists(keys[after:]) > 0
        except Exception as exc:
            self.guard.failed(exc)
            raise
        self.guard.ok()
        return Lookup(present, hole)

    def forget(self, req_id: str) -> None:
        self._answers.pop(req_id, None)
        self._pending.pop(req_id, None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
