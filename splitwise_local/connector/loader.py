"""Worker side, loading: vLLM's asynchronous protocol, off the forward path.

A `LoadPlan` arrives with the step that parked its request in `WAITING_FOR_REMOTE_KVS`; a
background thread fetches the request's chunks in one batched get (through shared memory the
values are read in place, pinned, with no copy), checks each one (its shape, and its seal or
per-layer checksums) and writes its rows, all layers at once, into the blocks vLLM allocated
for the request and for nothing else, while the engine keeps running the rest of the batch.
`finished` reports the request once its job is over, together with the blocks it could not
fill (a missing or corrupt chunk stops the load there, a dead store stops it before it
starts): vLLM recomputes exactly those, so a load can make a request slower but never wrong
and never failed. Nothing a job meets (store errors, bad payloads, even a bug of ours) leaves
this module as an exception: it becomes blocks to recompute and one warning for the request.

On a GPU the loader's host-to-device copies go on a stream of their own, ordered by CUDA events
(`DeviceOrder`), because vLLM's compute runs on another stream and nothing else orders the two:
`submit` (on the forward thread) records an event on vLLM's stream and the job's copies wait for
it, so they land after whatever vLLM queued into those blocks before (a zeroing of new blocks,
where it does one); after the job's last copy an event is recorded on the loader's stream, and
`finished` reports the request, and so lets vLLM's scheduler run it, only once that event has
completed. That is vLLM 0.32's contract for `get_finished`: a request named in its receiving set
is one whose blocks the next forward may read. A job that failed part way waits for its event
too: vLLM recomputes into the blocks our copies may still be writing. The source of each copy
is the store's shared memory, pageable, from which CUDA stages the bytes before the copy call
returns, so a value's lease may end right after it. On the CPU there are no streams and every
copy is done when the job ends.

The loader thread runs at a lower CPU priority (`NICENESS`): on a machine whose cores the
forward already uses, a landing load then takes its time rather than the running streams'.
When the engine has nothing else to do (`wait_idle`) the forward thread sleeps instead of
spinning through empty steps, so the load gets the core to itself.

With a tracer (tracing.py), each load of a traced request becomes a `splitwise.load` span from
its submission to the end of its job: the tokens, chunks and bytes it loaded, whether it loaded
every token planned (a hit) and, if not, why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from splitwise_local.connector.codec import ChunkCodec, CorruptChunk
from splitwise_local.connector.device import DeviceOrder, has_landed
from splitwise_local.connector.health import StoreDown, StoreGuard
from splitwise_local.connector.layout import KVLayout, LayerCaches, slots_for
from splitwise_local.store.errors import StoreError

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from splitwise_local.connector.metrics import Counters
    from splitwise_local.connector.planner import ChunkRef, LoadPlan
    from splitwise_local.connector.tracing import ConnectorTracer
    from splitwise_local.store.backend import KVBackend, Value

logger = logging.getLogger("splitwise_local.connector")
NICENESS = 10


@dataclass
class _Job:
    """One request's load: how far it got, and why it stopped if it did."""

    plan: LoadPlan
    loaded_to: int = 0
    chunks: int = 0
    bytes: int = 0
    failure: str | None = None
    tail: torch.Tensor | None = None
    verified: str = "off"
    seconds: float = 0.0
    invalid: set[int] = field(default_factory=set)
    after: torch.cuda.Event | None = None  # on vLLM's stream: the job's copies wait for it
    landed: torch.cuda.Event | None = None  # after the job's last copy; None: none in flight
    started_ns: int = 0  # when it was submitted (wall clock), for the load's span

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason


def _lower_priority() -> None:
    with contextlib.suppress(OSError):  # not permitted here: run at the engine's priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)


class KVLoader:
    """Runs `LoadPlan`s in the background and reports them done; one instance per worker."""

    def __init__(
        self,
        backend: Callable[[], KVBackend],
        layout: KVLayout,
        caches: LayerCaches,
        *,
        rank: int,
        guard: StoreGuard,
        counters: Counters,
        verify: bool = False,
        order: DeviceOrder | None = None,
        codec: ChunkCodec | None = None,
        tracer: ConnectorTracer | None = None,
    ) -> None:
        self._backend = backend
        self.codec = codec or ChunkCodec()  # with the store's token: only sealed chunks pass
        self.layout = layout
        self.caches = caches
        self.rank = rank
        self.guard = guard
        self.counters = counters
        self.verify = verify
        self.order = order or DeviceOrder(caches.layers[0].device)
        self.tracer = tracer
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="splitwise-load", initializer=_lower_priority
        )
        self._changed = threading.Condition()
        self._running: set[str] = set()  # requests whose job has not ended
        self._done: list[_Job] = []
        self._gone: set[str] = set()  # finished while their job was running
        self._tails: dict[str, torch.Tensor] = {}

    def submit(self, plans: Sequence[LoadPlan]) -> None:
        for plan in plans:
            with self._changed:
                self._running.add(plan.req_id)
            verified = "ok" if self.verify else "off"
            job = _Job(plan, loaded_to=plan.start, verified=verified, after=self.order.mark(),
                       started_ns=time.time_ns())  # fmt: skip
            self._executor.submit(self._run, job)

    def wait_idle(self, timeout: float) -> None:
        """Sleeps until a job ends or `timeout` passes, if any job is still running."""
        with self._changed:
            if self._running and not self._done:
                self._changed.wait(timeout)

    def finished(self) -> tuple[set[str], set[int]]:
        """Requests whose load ended, and whose copies have landed, since the last call, and
        the blocks left to recompute."""
        with self._changed:
            jobs = [job for job in self._done if has_landed(job.landed)]
            self._done = [job for job in self._done if job not in jobs]
        for job in jobs:
            req_id = job.plan.req_id
            if job.tail is not None and req_id not in self._gone:
                self._tails[req_id] = job.tail
            self._gone.discard(req_id)
        return {job.plan.req_id for job in jobs}, set().union(*(job.invalid for job in jobs))

    def take_tail(self, req_id: str) -> torch.Tensor | None:
        """The stored KV of the request's last prompt token, `[layers, kv, 1, heads, D]`."""
        return self._tails.pop(req_id, None)

    def forget(self, req_ids: Iterable[str]) -> None:
        """Requests vLLM finished (aborted ones too): their tails are of no more use."""
        with self._changed:
            loading = self._running | {job.plan.req_id for job in self._done}
            self._gone.update(req_id for req_id in req_ids if req_id in loading)
        for req_id in req_ids:
            self._tails.pop(req_id, None)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    # ---- one job, on the loader thread --------------------------------------------------

    def _run(self, job: _Job) -> None:
        started = time.perf_counter()
        with self.order.copies(job.after) as landed:
            try:
                self.guard.check()
                self._fetch(job)
                self.guard.ok()
            except StoreDown as exc:
                job.fail(f"store: {exc}")
            except (StoreError, OSError) as exc:
                self.guard.failed(exc)
                job.fail(f"store: {exc}")
            except Exception as exc:  # a bug of ours must cost a recompute, not the engine
                logger.exception("splitwise load req=%s failed", job.plan.req_id)
                job.fail(f"{type(exc).__name__}: {exc}")
        job.landed = landed[0] if landed else None
        job.seconds = time.perf_counter() - started
        self._finish(job)

    def _fetch(self, job: _Job) -> None:
        plan = job.plan
        keys = [chunk.keys[self.rank] for chunk in plan.chunks]
        backend = self._backend()
        get_into = getattr(backend, "get_into", None)  # our clients read in place
        if get_into is not None:
            get_into(keys, lambda i, value: self._use(job, plan.chunks[i], value))
            return
        for chunk, value in zip(plan.chunks, backend.get_many(keys), strict=True):
            self._use(job, chunk, value)

    def _use(self, job: _Job, chunk: ChunkRef, value: Value | None) -> None:
        """Checks one fetched chunk and writes its rows; after a failure, ignores the rest."""
        if job.failure is not None:
            return
        if value is None:
            job.fail(f"chunk {chunk.start}-{chunk.end} missing")
            return
        plan = job.plan
        shape = (len(self.caches), self.layout.kv, chunk.end - chunk.start,
                 self.layout.heads, self.layout.head_size)  # fmt: skip
        try:
            kv = self.codec.decode(value, shape, chunk.keys[self.rank])
        except CorruptChunk as exc:
            job.fail(f"chunk {chunk.start}-{chunk.end}: {exc}")
            return
        lo, hi = max(chunk.start, plan.start), min(chunk.end, plan.end)
        if hi > lo:
            slots = slots_for(plan.block_ids, lo, hi, self.layout.block_size)
            rows = kv[:, :, lo - chunk.start : hi - chunk.start]
            self.layout.scatter(self.caches, slots, rows)
            if self.verify:
                written = self.layout.gather(self.caches, slots).to(rows.device)
                if not torch.equal(written, rows):
                    job.verified = "MISMATCH"
            job.loaded_to = hi
        if plan.tail is not None and chunk.start <= plan.tail < chunk.end:
            at = plan.tail - chunk.start
            job.tail = kv[:, :, at : at + 1].clone()  # the view dies with the lease
        job.chunks += 1
        job.bytes += len(value)

    def _finish(self, job: _Job) -> None:
        plan = job.plan
        size = self.layout.block_size
        if job.loaded_to < plan.end:
            first, last = job.loaded_to // size, (plan.end - 1) // size
            job.invalid = set(plan.block_ids[first : last + 1])
            logger.warning(
                "splitwise load-partial req=%s loaded=%d of %d tokens, recomputing tokens "
                "%d-%d: %s",
                plan.req_id, job.loaded_to - plan.start, plan.end - plan.start,
                first * size, plan.end, job.failure,
            )  # fmt: skip
        if job.failure is not None:
            job.tail = None
        tokens = job.loaded_to - plan.start
        self.counters.add(
            loads=1 if tokens else 0, loaded_tokens=tokens, loaded_bytes=job.bytes,
            load_seconds=job.seconds, load_failures=1 if job.failure else 0,
        )  # fmt: skip
        logger.info(
            "splitwise load req=%s tokens=%d chunks=%d bytes=%d ms=%.1f verified=%s tail=%s",
            plan.req_id, tokens, job.chunks, job.bytes, job.seconds * 1e3, job.verified,
            "kept" if job.tail is not None else "none",
        )  # fmt: skip
        if self.tracer is not None and plan.trace is not None:
            attributes: dict[str, AttributeValue] = {
                "splitwise.request_id": plan.req_id,
                "splitwise.tokens": tokens,
                "splitwise.planned_tokens": plan.end - plan.start,
                "splitwise.chunks": job.chunks,
                "splitwise.bytes": job.bytes,
                "splitwise.hit": job.loaded_to == plan.end,
                "splitwise.verified": job.verified,
                "splitwise.tail_kept": job.tail is not None,
            }
            self.tracer.span("splitwise.load", plan.trace, job.started_ns, time.time_ns(),
                             attributes, job.failure)  # fmt: skip
        with self._changed:
            self._running.discard(plan.req_id)
            self._done.append(job)
            self._changed.notify_all()
