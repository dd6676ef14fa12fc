"""Scheduler side: decides, each engine step, which chunks the worker loads and saves.

Runs in vLLM's scheduler (no KV tensors here). It turns prompts into chunk keys, asks the store
how much of a prompt it holds, and hands the worker a `StepPlan` per step: whole chunks to save
(each one as soon as its last token has been computed, so chunked prefill saves every step's
completed chunks and the final partial chunk) and token ranges to load into the blocks vLLM
allocated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitwise_local.connector.keys import KeyIdentity, chunk_keys, chunk_spans

logger = logging.getLogger(__name__)


@dataclass
class ChunkRef:
    """One stored chunk: the prompt tokens [start, end) it holds and its key on every rank.

    `keys[r]` is the key of rank r's share (`KeyIdentity.rank_index`); one rank per engine
    unless tensor or pipeline parallelism splits the KV.
    """

    keys: tuple[str, ...]
    start: int
    end: int

    @property
    def key(self) -> str:
        """Rank 0's key: the one the proxy derives and a single-rank engine uses."""
        return self.keys[0]


@dataclass
class LoadPlan:
    """Write tokens [start, end) of a prompt, from `chunks`, into the request's blocks.

    `tail` is the prompt's last token when the load reaches it (end == prompt length - 1). The
    engine computes that token itself, in a 1-row forward whose bf16 numerics differ slightly
    from the prefill's full forward; after each layer's attention the worker overwrites its KV
    with the prefill's, so every prompt token's KV is the prefill's, as in one engine alone.
    """

    req_id: str
    chunks: list[ChunkRef]
    start: int
    end: int
    block_ids: list[int]
    tail: int | None = None


@dataclass
class SavePlan:
    """Store `chunks`, whose tokens are all computed now, from the request's blocks."""

    req_id: str
    chunks: list[ChunkRef]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[LoadPlan] = field(default_factory=list)
    saves: list[SavePlan] = field(default_factory=list)


@dataclass
class _Tracked:
    """A request the producer side saves for: its chunks and how far they are saved."""

    chunks: list[ChunkRef]
    block_ids: list[int]
    next_chunk: int = 0


def prompt_chunks(identity: KeyIdentity, token_ids: Sequence[int]) -> list[ChunkRef]:
    per_rank = [chunk_keys(rank, token_ids) for rank in identity.all_ranks()]
    spans = chunk_spans(len(token_ids), identity.chunk_size)
    return [
        ChunkRef(tuple(keys), start, end)
        for keys, (start, end) in zip(zip(*per_rank, strict=True), spans, strict=True)
    ]


def stored_chunks(exists: Callable[[Sequence[str]], int], chunks: Sequence[ChunkRef]) -> int:
    """How many of `chunks`, from the first, the store holds on every rank (one query)."""
    if not chunks:
        return 0
    ranks = len(chunks[0].keys)
    return exists([key for chunk in chunks for key in chunk.keys]) // ranks


class Planner:
    """Per-request bookkeeping of the scheduler-side connector.

    `exists(keys) -> int` is the store's batched prefix query; it may raise the store's errors,
    which the caller turns into "no hit".
    """

    def __init__(
        self,
        identity: KeyIdentity,
        exists: Callable[[Sequence[str]], int],
        *,
        loads: bool,
        saves: bool,
    ) -> None:
        self.identity = identity
        self.exists = exists
        self.loads = loads
        self.saves = saves
        self._chunks: dict[str, list[ChunkRef]] = {}
        self._matched: dict[str, tuple[int, int]] = {}
        self._pending_loads: dict[str, tuple[int, int]] = {}
        self._tracked: dict[str, _Tracked] = {}

    def chunks_of(self, req_id: str, token_ids: Sequence[int]) -> list[ChunkRef]:
        if req_id not in self._chunks:
            self._chunks[req_id] = prompt_chunks(self.identity, token_ids)
        return self._chunks[req_id]

    def match(self, req_id: str, token_ids: Sequence[int], num_computed: int) -> int:
        """Tokens beyond `num_computed` the store can supply, at most prompt length - 1.

        The last prompt token is always left for the engine to compute: that step produces the
        first output token (and matching every token trips vLLM's "num_new_tokens > 0").
        """
        if not self.loads or len(token_ids) < 2:
            return 0
        chunks = self.chunks_of(req_id, token_ids)
        present = stored_chunks(self.exists, chunks)
        covered = chunks[present - 1].end if present else 0
        matched = min(covered, len(token_ids) - 1)
        self._matched[req_id] = (num_computed, matched)
        return max(0, matched - num_computed)

    def allocated(self, req_id: str, num_external: int) -> None:
        """vLLM allocated blocks for `num_external` loaded tokens after the local ones."""
        if num_external <= 0 or req_id not in self._matched:
            return
        num_computed, _ = self._matched.pop(req_id)
        self._pending_loads[req_id] = (num_computed, num_computed + num_external)

    def new_request(
        self,
        req_id: str,
        token_ids: Sequence[int],
        block_ids: list[int],
        computed_after: int,
        plan: StepPlan,
    ) -> None:
        """A request scheduled for the first time."""
        chunks = self.chunks_of(req_id, token_ids)
        if req_id in self._pending_loads:
            start, end = self._pending_loads.pop(req_id)
            tail = end if end == len(token_ids) - 1 else None
            reach = end + 1 if tail is not None else end
            needed = [c for c in chunks if c.start < reach and c.end > start]
            plan.loads.append(LoadPlan(req_id, needed, start, end, list(block_ids), tail))
        if not self.saves:
            return
        # Chunks already in the store (a shared prefix, a load) are not saved again.
        tracked = _Tracked(chunks, list(block_ids), next_chunk=self._stored_prefix(chunks))
        self._tracked[req_id] = tracked
        self._plan_saves(req_id, tracked, computed_after, plan)

    def running_request(
        self,
        req_id: str,
        new_block_ids: list[int] | None,
        computed_after: int,
        plan: StepPlan,
    ) -> None:
        tracked = self._tracked.get(req_id)
        if tracked is None:
            return
        if new_block_ids:
            tracked.block_ids.extend(new_block_ids)
        self._plan_saves(req_id, tracked, computed_after, plan)

    def finished(self, req_id: str) -> None:
        for table in (self._chunks, self._matched, self._pending_loads, self._tracked):
            table.pop(req_id, None)

    def _stored_prefix(self, chunks: list[ChunkRef]) -> int:
        if not chunks:
            return 0
        try:
            return stored_chunks(self.exists, chunks)
        except Exception as exc:  # the store's errors: saving again is the safe answer
            logger.debug("exists failed while planning saves: %s", exc)
            return 0

    @staticmethod
    def _plan_saves(req_id: str, tracked: _Tracked, computed_after: int, plan: StepPlan) -> None:
        ready = []
        while tracked.next_chunk < len(tracked.chunks):
            chunk = tracked.chunks[tracked.next_chunk]
            if chunk.end > computed_after:
                break
            ready.append(chunk)
            tracked.next_chunk += 1
        if ready:
            plan.saves.append(SavePlan(req_id, ready, list(tracked.block_ids)))
