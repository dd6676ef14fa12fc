"""Worker side, saving: the chunks a step completed go from the paged cache to the store.

Saves run off the forward path. In `wait_for_save` every planned chunk is gathered, all layers
at once, into a token-major tensor of its own (on a GPU: a device copy, then a non-blocking copy
to pinned host memory, with a CUDA event after it), and the forward goes on; one background
thread waits for that event, checks which chunks the store holds already (a shared prefix, a
chunk this engine loaded), encodes the rest and puts them. The gathered copies wait in a queue
bounded by bytes (`queue_bytes`): a request whose chunks do not fit is not saved from there on
(its later chunks would be unreachable, keys chain) and counted in `save_dropped`; nothing ever
waits for room. A store that fails or times out opens this saver's own `StoreGuard`, never the
one loads use, so a store that is slow to write keeps serving loads.

Why gather in the step rather than let vLLM keep the blocks (`request_finished` returning
`delay_free_blocks` until `get_finished` reports the request in `finished_sending`): vLLM 0.32
frees a *preempted* request's blocks without asking the connector (`Scheduler._preempt_request`),
so a put still reading them could store another request's KV; a copy taken within the step is
ours whatever vLLM does with the blocks next. On a GPU the gather is queued on vLLM's stream,
before anything a later step writes into those blocks. The copy costs one memory-bound pass over
the chunk, far below what computing it cost.

When the engine answers, its prompt's chunks are in the store: the proxy sends the request on to
decode as soon as prefill answers, and decode asks the store once. vLLM 0.32 sends a request's
answer in the step in which it stops, whatever `request_finished` returns
(`Scheduler.update_from_output` emits the finished `EngineCoreOutput` right after
`_free_request`; `delay_free_blocks` only holds the blocks), so the connector cannot hold the
answer back without holding the step. A pure producer (the prefill engine, whose answers carry
nothing but the KV they stored) therefore waits in `wait_for_save` for the puts of the chunks
that complete a prompt, at most `answer_wait_s`: a store that keeps up costs the step one put,
as before; a slow one costs one bounded wait, and then none until the queue has drained (each
answer sent before its chunks were stored is counted in `save_late`; decode then finds fewer
chunks and computes the rest). An engine that also decodes (kv_both) never waits: nobody is
waiting for its saves.

With a tracer (tracing.py), each plan of a traced request becomes a `splitwise.save` span from
its gather in the step to its put (or to the moment it was given up, with why).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from splitwise_local.connector.device import copies_done, to_host
from splitwise_local.connector.health import StoreDown, StoreGuard
from splitwise_local.connector.layout import KVLayout, LayerCaches, slots_for

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

    from splitwise_local.connector.codec import ChunkCodec
    from splitwise_local.connector.metrics import Counters
    from splitwise_local.connector.planner import SavePlan
    from splitwise_local.connector.tracing import ConnectorTracer
    from splitwise_local.store.backend import KVBackend

logger = logging.getLogger("splitwise_local.connector")
QUEUE_BYTES = 512 << 20
ANSWER_WAIT_S = 1.0


@dataclass
class _Taken:
    """One plan's chunks, copied out of the paged cache in their step, queued for the store."""

    plan: SavePlan
    rows: list[torch.Tensor]
    copied: torch.cuda.Event | None  # after the rows' device-to-host copies (GPU)
    seconds: float  # spent gathering them, in the step
    size: int  # bytes the queue counts for them
    started_ns: int  # when the gather began (wall clock), for the save's span


class KVSaver:
    """Stores the chunks of `SavePlan`s in the background; one instance per worker."""

    def __init__(
        self,
        backend: Callable[[], KVBackend],
        codec: ChunkCodec,
        layout: KVLayout,
        caches: LayerCaches,
        *,
        rank: int,
        counters: Counters,
        queue_bytes: int = QUEUE_BYTES,
        answer_wait_s: float = 0.0,
        guard: StoreGuard | None = None,
        tracer: ConnectorTracer | None = None,
    ) -> None:
        self._backend = backend
        self.codec = codec
        self.layout = layout
        self.caches = caches
        self.rank = rank
        self.counters = counters
        self.queue_bytes = queue_bytes
        self.answer_wait_s = answer_wait_s
        self.guard = guard or StoreGuard("saves")
        self.tracer = tracer
        first = caches.layers[0]
        self._token_bytes = (
            len(caches) * layout.kv * layout.heads * layout.head_size * first.element_size()
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitwise-save")
        self._lock = threading.Lock()
        self._queued = 0  # bytes gathered and not yet stored (or given up)
        self._behind = False  # an answer went out late; no more waits until the queue drains
        self._active: set[str] = set()  # requests with saves, until vLLM finishes them
        self._stopped: dict[str, str] = {}  # requests not saved from some chunk on, and why

    @property
    def queued_bytes(self) -> int:
        with self._lock:
            return self._queued

    def save(self, plans: Sequence[SavePlan]) -> None:
        """Gathers every planned chunk that fits the queue and hands it to the save thread.

        Returns at once, except for the bounded wait for a prompt's last chunks (`answer_wait_s`).
        """
        if not plans:
            return
        with self._lock:
            self._active.update(plan.req_id for plan in plans)
            behind = self._behind
        try:
            self.guard.check()
        except StoreDown as exc:
            for plan in plans:
                self._give_up(plan, "save_failures", f"skipped: {exc}")
                self._trace(plan, time.time_ns(), failure=f"skipped: {exc}")
            return
        answers = []
        for plan in plans:
            job = self._queue(plan)
            waits = plan.completes_prompt and self.answer_wait_s > 0 and not behind
            if job is not None and waits:
                answers.append((plan, job))
        if answers:
            self._wait_for(answers)

    def _queue(self, plan: SavePlan) -> Future[None] | None:
        """Gathers the plan's chunks and submits their put; None when the request is not saved
        from here on (stopped before, or its chunks do not fit the queue)."""
        started_ns = time.time_ns()
        with self._lock:
            stopped = self._stopped.get(plan.req_id)
        if stopped is not None:
            self.counters.add(**{stopped: len(plan.chunks)})
            self._trace(plan, started_ns, failure=f"not saved from an earlier chunk on ({stopped})")
            return None
        size = sum(chunk.end - chunk.start for chunk in plan.chunks) * self._token_bytes
        with self._lock:
            fits = self._queued + size <= self.queue_bytes
            if fits:
                self._queued += size
        if not fits:
            reason = f"save queue full ({self.queued_bytes >> 20} MiB)"
            self._give_up(plan, "save_dropped", reason)
            self._trace(plan, started_ns, failure=reason)
            return None
        started = time.perf_counter()
        rows = []
        for chunk in plan.chunks:
            slots = slots_for(plan.block_ids, chunk.start, chunk.end, self.layout.block_size)
            rows.append(to_host(self.layout.gather(self.caches, slots)))
        copied = copies_done(self.caches.device)
        taken = _Taken(plan, rows, copied, time.perf_counter() - started, size, started_ns)
        return self._executor.submit(self._put, taken)

    def _wait_for(self, answers: list[tuple[SavePlan, Future[None]]]) -> None:
        """At most `answer_wait_s` for the puts of chunks that complete a prompt; an answer sent
        before them is counted late, and no answer waits again until the queue has drained."""
        _, late = wait([job for _, job in answers], timeout=self.answer_wait_s)
        with self._lock:
            self._behind = bool(late) and self._queued > 0
        for plan, job in answers:
            if job in late:
                self.counters.add(save_late=1)
                logger.info(
                    "splitwise save-late req=%s: answering before its chunks are stored "
                    "(no put within %.1f s)", plan.req_id, self.answer_wait_s,
                )  # fmt: skip

    def _give_up(self, plan: SavePlan, counter: str, reason: str) -> None:
        """This and every later chunk of the request go unsaved, counted under `counter`."""
        self.counters.add(**{counter: len(plan.chunks)})
        with self._lock:
            first = plan.req_id not in self._stopped
            if first and plan.req_id in self._active:  # a finished request is not remembered
                self._stopped[plan.req_id] = counter
        if first:
            logger.warning(
                "splitwise save req=%s stops at tokens %d-: %s",
                plan.req_id, plan.chunks[0].start, reason,
            )  # fmt: skip

    def _put(self, taken: _Taken) -> None:
        """On the save thread: never raises (the result is counted, logged and traced)."""
        stored: dict[str, int] = {}
        failure = None
        try:
            self.guard.check()  # a store that failed meanwhile: the queue drains at once
            stored = self._store(taken)
        except StoreDown as exc:
            failure = f"skipped: {exc}"
            self._give_up(taken.plan, "save_failures", failure)
        except Exception as exc:  # the store's errors, or a bug of ours: the cache pays
            self.guard.failed(exc)
            failure = f"{type(exc).__name__}: {exc}"
            self._give_up(taken.plan, "save_failures", failure)
        finally:
            with self._lock:
                self._queued -= taken.size
                self._behind = self._behind and self._queued > 0
        self._trace(taken.plan, taken.started_ns, stored, failure)

    def _trace(
        self,
        plan: SavePlan,
        started_ns: int,
        stored: dict[str, int] | None = None,
        failure: str | None = None,
    ) -> None:
        """The plan's `splitwise.save` span, ending now, if its request is traced."""
        if self.tracer is None or plan.trace is None:
            return
        attributes: dict[str, AttributeValue] = {
            "splitwise.request_id": plan.req_id,
            "splitwise.first_token": plan.chunks[0].start,
            "splitwise.planned_tokens": plan.chunks[-1].end - plan.chunks[0].start,
            "splitwise.completes_prompt": plan.completes_prompt,
        }
        attributes.update({f"splitwise.{name}": value for name, value in (stored or {}).items()})
        self.tracer.span("splitwise.save", plan.trace, started_ns, time.time_ns(), attributes,
                         failure)  # fmt: skip

    def _store(self, taken: _Taken) -> dict[str, int]:
        """Puts the chunks the store lacks; returns what it stored (tokens, chunks, bytes) and
        how many chunks it held already."""
        started = time.perf_counter()
        if taken.copied is not None:
            taken.copied.synchronize()  # the GPU-to-host copies of these chunks have landed
        plan = taken.plan
        keys = [chunk.keys[self.rank] for chunk in plan.chunks]
        backend = self._backend()
        stored = backend.exists(keys)  # a shared prefix is in the store already
        todo = zip(keys[stored:], taken.rows[stored:], strict=True)
        items = [(key, self.codec.encode(kv, key)) for key, kv in todo]
        backend.put_many(items)
        self.guard.ok()
        put = plan.chunks[stored:]
        for chunk, (key, _) in zip(put, items, strict=True):
            logger.debug(
                "splitwise save-key req=%s tokens=%d-%d key=%s",
                plan.req_id, chunk.start, chunk.end, key,
            )  # fmt: skip
        tokens = sum(chunk.end - chunk.start for chunk in put)
        size = sum(len(value) for _, value in items)
        seconds = taken.seconds + time.perf_counter() - started
        self.counters.add(saves=1, saved_tokens=tokens, saved_bytes=size, save_seconds=seconds)
        logger.info(
            "splitwise save req=%s tokens=%d chunks=%d bytes=%d already_stored=%d ms=%.1f",
            plan.req_id, tokens, len(put), size, stored, seconds * 1e3,
        )  # fmt: skip
        return {"tokens": tokens, "chunks": len(put), "bytes": size, "already_stored": stored}

    def forget(self, req_ids: Iterable[str]) -> None:
        """Requests vLLM finished: their chunks still queued are stored all the same."""
        with self._lock:
            for req_id in req_ids:
                self._active.discard(req_id)
                self._stopped.pop(req_id, None)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
