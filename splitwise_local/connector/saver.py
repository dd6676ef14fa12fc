"""Worker side, saving: the chunks a step completed go from the paged cache to the store.

After the step's forward (`wait_for_save`) every planned chunk is gathered, all layers at once,
into a token-major tensor of its own; a background thread checks which of them the store holds
already (a shared prefix, a chunk this engine loaded), encodes the rest and puts them. The step
waits for those puts, so when the engine answers, every chunk is readable by any other engine;
but never longer than `DEADLINE_S`: a frozen store then costs the saves, not the engine, and
the `StoreGuard` stops further saves until the store answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from splitwise_local.connector.codec import ChunkCodec
from splitwise_local.connector.health import StoreDown, StoreGuard
from splitwise_local.connector.layout import KVLayout, LayerCaches, slots_for
from splitwise_local.connector.metrics import Counters
from splitwise_local.connector.planner import SavePlan

logger = logging.getLogger("splitwise_local.connector")
DEADLINE_S = 2.0


def to_host(rows: torch.Tensor) -> torch.Tensor:
    """KV leaving a GPU goes to pinned host memory, copied without blocking the forward.

    On the CPU this is the identity. The CUDA branch is written from PyTorch's documented
    semantics and has not run here (no GPU on this project's machines).
    """
    if rows.device.type == "cpu":
        return rows
    host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
    host.copy_(rows, non_blocking=True)
    return host


def copies_done(device: torch.device):
    """A CUDA event after this step's device-to-host copies (None on the CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


class KVSaver:
    """Stores the chunks of `SavePlan`s; one instance per worker."""

    def __init__(
        self,
        backend: Callable[[], object],
        codec: ChunkCodec,
        layout: KVLayout,
        caches: LayerCaches,
        *,
        rank: int,
        guard: StoreGuard,
        counters: Counters,
        deadline_s: float = DEADLINE_S,
    ) -> None:
        self._backend = backend
        self.codec = codec
        self.layout = layout
        self.caches = caches
        self.rank = rank
        self.guard = guard
        self.counters = counters
        self.deadline_s = deadline_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitwise-save")
        self._skipped: set[str] = set()  # requests already told that their saves are skipped

    def save(self, plans: Sequence[SavePlan]) -> None:
        """Gathers every planned chunk now and waits (bounded) until they are stored."""
        if not plans:
            return
        try:
            self.guard.check()
        except StoreDown as exc:
            for plan in plans:
                self.counters.add(save_failures=len(plan.chunks))
                if plan.req_id not in self._skipped:
                    self._skipped.add(plan.req_id)
                    logger.warning("splitwise save skipped req=%s: %s", plan.req_id, exc)
            return
        device = self.caches.layers[0].device
        pending: list[tuple[SavePlan, Future]] = []
        for plan in plans:
            started = time.perf_counter()
            rows = []
            for chunk in plan.chunks:
                slots = slots_for(plan.block_ids, chunk.start, chunk.end, self.layout.block_size)
                rows.append(to_host(self.layout.gather(self.caches, slots)))
            gathered = time.perf_counter() - started
            job = self._executor.submit(self._put, plan, rows, copies_done(device), gathered)
            pending.append((plan, job))
        _, late = wait([job for _, job in pending], timeout=self.deadline_s)
        failures = []
        for plan, job in pending:
            if job in late:
                failures.append(f"req={plan.req_id}: no answer within {self.deadline_s} s")
                self.counters.add(save_failures=len(plan.chunks))
            elif job.exception() is not None:
                failures.append(f"req={plan.req_id}: {job.exception()}")
                self.counters.add(save_failures=len(plan.chunks))
        if late:
            self.guard.failed(TimeoutError(f"saves took over {self.deadline_s} s"))
        if failures:
            logger.error("splitwise: %d chunk saves failed: %s", len(failures), failures[0])

    def _put(self, plan: SavePlan, rows: list[torch.Tensor], copied, gathered: float) -> None:
        started = time.perf_counter()
        if copied is not None:
            copied.synchronize()  # the GPU-to-host copies of these chunks have landed
        keys = [chunk.keys[self.rank] for chunk in plan.chunks]
        backend = self._backend()
        try:
            stored = backend.exists(keys)  # a shared prefix is in the store already
            todo = zip(keys[stored:], rows[stored:], strict=True)
            items = [(key, self.codec.encode(kv)) for key, kv in todo]
            backend.put_many(items)
        except Exception as exc:
            self.guard.failed(exc)
            raise
        self.guard.ok()
        put = plan.chunks[stored:]
        for chunk, (key, _) in zip(put, items, strict=True):
            logger.debug(
                "splitwise save-key req=%s tokens=%d-%d key=%s",
                plan.req_id, chunk.start, chunk.end, key,
            )  # fmt: skip
        tokens = sum(chunk.end - chunk.start for chunk in put)
        size = sum(len(value) for _, value in items)
        seconds = gathered + time.perf_counter() - started
        self.counters.add(saves=1, saved_tokens=tokens, saved_bytes=size, save_seconds=seconds)
        logger.info(
            "splitwise save req=%s tokens=%d chunks=%d bytes=%d already_stored=%d ms=%.1f",
            plan.req_id, tokens, len(put), size, stored, seconds * 1e3,
        )  # fmt: skip

    def forget(self, req_ids) -> None:
        self._skipped.difference_update(req_ids)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
