"""Scheduler side: decides, each engine step, which chunks the worker loads and saves.

Runs in vLLM's scheduler (no KV tensors here). It turns prompts into chunk keys, learns from
the store how much of a prompt it holds (asynchronously, `StoreLookups`), and hands the worker
a `StepPlan` per step:

- loads, vLLM's asynchronous protocol: `match` answers `(tokens, True)`, vLLM allocates blocks
  and parks the request in `WAITING_FOR_REMOTE_KVS`, `allocated` turns that into a `LoadPlan`
  the worker runs in the background; the request is scheduled once the worker reports it done.
  At most one load per request: if vLLM asks again (after a failed load, or a preemption), the
  answer is 0 and the engine computes.
- tails: the step in which a loaded request computes its last prompt token, so the worker can
  put the prefill's KV for that token back (see `LoadPlan.tail`);
- saves: whole chunks, each as soon as its last token has been computed, so chunked prefill
  saves every step's completed chunks and the final partial chunk; a request preempted and
  resumed goes on saving from its new blocks where it left off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitwise_local.connector.keys import (
    NO_EXTRAS,
    KeyExtras,
    KeyIdentity,
    chunk_keys,
    chunk_spans,
)
from splitwise_local.connector.lookups import Lookup

logger = logging.getLogger("splitwise_local.connector")


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

    `tail` is the prompt's last position when the store holds it too: the engine computes that
    token itself, in a 1-row forward whose bf16 numerics differ slightly from the prefill's full
    forward, so the worker keeps the stored KV of that token and writes it over the engine's
    once the token has been computed (a `TailPlan`), leaving every prompt token's KV the
    prefill's, as in one engine alone. Only with a lossless serde: with a lossy one the
    engine's own KV is closer to the truth than the stored copy.

    Measured (24 prompts of 20 to 1,500 tokens, 64 greedy tokens against a plain engine,
    SmolLM2, bf16, `vec` packing): 24 identical with the overwrite, 21 without it (the 999-,
    1,000- and 1,400-token prompts parted at tokens 5, 29 and 9). It stays;
    `"keep_tail": false` in `kv_connector_extra_config` turns it off to measure again.
    """

    req_id: str
    chunks: list[ChunkRef]
    start: int
    end: int
    block_ids: list[int]
    tail: int | None = None
    trace: str | None = None  # the request's traceparent: its load span's parent (tracing.py)


@dataclass
class TailPlan:
    """This step computed `req_id`'s last prompt token, into cache slot `slot`."""

    req_id: str
    slot: int


@dataclass
class SavePlan:
    """Store `chunks`, whose tokens are all computed now, from the request's blocks;
    `completes_prompt` when they include the prompt's last chunk."""

    req_id: str
    chunks: list[ChunkRef]
    block_ids: list[int]
    completes_prompt: bool = False
    trace: str | None = None  # the request's traceparent: its save span's parent (tracing.py)


@dataclass
class StepPlan:
    """The worker's orders for one step; `idle` when the step runs no forward at all."""

    loads: list[LoadPlan] = field(default_factory=list)
    tails: list[TailPlan] = field(default_factory=list)
    saves: list[SavePlan] = field(default_factory=list)
    idle: bool = False


@dataclass
class _Tracked:
    """A request the producer side saves for: its chunks and how far they are saved."""

    chunks: list[ChunkRef]
    block_ids: list[int]
    next_chunk: int = 0
    trace: str | None = None


@dataclass
class _Match:
    """The answer `match` gave: load [start, end), keep the tail if `tail`."""

    start: int
    end: int
    tail: bool
    stored_chunks: int


def prompt_chunks(
    identity: KeyIdentity, token_ids: Sequence[int], extras: KeyExtras = NO_EXTRAS
) -> list[ChunkRef]:
    per_rank = [chunk_keys(rank, token_ids, extras) for rank in identity.all_ranks()]
    spans = chunk_spans(len(token_ids), identity.chunk_size)
    return [
        ChunkRef(tuple(keys), start, end)
        for keys, (start, end) in zip(zip(*per_rank, strict=True), spans, strict=True)
    ]


def chunk_keys_of(chunks: Sequence[ChunkRef]) -> list[str]:
    """Every rank's key of every chunk, chunk-major: what the store's prefix query asks about."""
    return [key for chunk in chunks for key in chunk.keys]


class Planner:
    """Per-request bookkeeping of the scheduler-side connector.

    `lookup(req_id, keys)` is the store's prefix query for `chunk_keys_of(chunks)`: a
    `Lookup` (keys present from the first, and whether later ones are held past a missing
    one), None while the answer is not in yet; it raises when the store cannot answer (the
    connector turns that into "compute the prompt").
    """

    def __init__(
        self,
        identity: KeyIdentity,
        lookup: Callable[[str, Sequence[str]], Lookup | None],
        *,
        block_size: int,
        loads: bool,
        saves: bool,
        keep_tail: bool,
    ) -> None:
        self.identity = identity
        self.block_size = block_size
        self.lookup = lookup
        self.loads = loads
        self.saves = saves
        self.keep_tail = keep_tail
        self._ranks = len(identity.all_ranks())
        self._chunks: dict[str, list[ChunkRef]] = {}
        self._matched: dict[str, _Match] = {}
        self._attempted: set[str] = set()  # requests whose one load has been planned
        self._tails: set[str] = set()  # loaded requests whose last token is still to compute
        self._stored: dict[str, int] = {}  # chunks the store held when the load was planned
        self._new_loads: list[LoadPlan] = []
        self._tracked: dict[str, _Tracked] = {}
        self._extras: dict[str, KeyExtras | None] = {}  # None: neither loaded nor saved
        self._traces: dict[str, str] = {}  # the traceparent of each request that has one

    def admit(self, req_id: str, extras: KeyExtras | None, trace: str | None = None) -> None:
        """What the request's keys cover besides its tokens (`keys.request_key_extras`); None
        when the keys cannot cover the request: it is then neither loaded nor saved. The
        connector admits every request in `get_num_new_matched_tokens`, which vLLM calls before
        it first schedules one (and again after a preemption); a request never admitted (unit
        tests) is keyed by its tokens alone. `trace`: its traceparent, passed on in its plans."""
        self._extras[req_id] = extras
        if trace is not None:
            self._traces[req_id] = trace

    def chunks_of(self, req_id: str, token_ids: Sequence[int]) -> list[ChunkRef]:
        if req_id not in self._chunks:
            extras = self._extras.get(req_id) or NO_EXTRAS
            self._chunks[req_id] = prompt_chunks(self.identity, token_ids, extras)
        return self._chunks[req_id]

    def match(self, req_id: str, token_ids: Sequence[int], num_computed: int) -> int | None:
        """Tokens beyond `num_computed` the store can supply, None while the store is asked.

        At most prompt length - 1: the engine computes the last prompt token itself, since that
        step produces the first output token. When the store holds that token too (and the
        serde is lossless) the load keeps its stored KV for the tail.
        """
        if not self.loads or len(token_ids) < 2 or req_id in self._attempted:
            return 0
        if self._extras.get(req_id, NO_EXTRAS) is None:
            return 0
        chunks = self.chunks_of(req_id, token_ids)
        answer = self.lookup(req_id, chunk_keys_of(chunks))
        if answer is None:
            return None
        stored = answer.present // self._ranks
        covered = chunks[stored - 1].end if stored else 0
        if answer.hole:
            logger.warning(
                "splitwise req=%s: the store lacks tokens %d-%d but holds later chunks (evicted "
                "or a failed save); loading tokens %d-%d, computing the rest",
                req_id, covered, chunks[stored].end, num_computed, covered,
            )  # fmt: skip
        end = min(covered, len(token_ids) - 1)
        if end <= num_computed:
            return 0
        tail = self.keep_tail and covered == len(token_ids)
        self._matched[req_id] = _Match(num_computed, end, tail, stored)
        return end - num_computed

    def allocated(self, req_id: str, block_ids: list[int], num_external: int) -> None:
        """vLLM allocated `block_ids` for the request, `num_external` tokens to be loaded."""
        matched = self._matched.pop(req_id, None)
        if num_external <= 0 or matched is None:
            return
        if matched.start + num_external != matched.end:
            logger.warning(
                "splitwise req=%s: vLLM allocated %d external tokens, the match was %d",
                req_id, num_external, matched.end - matched.start,
            )  # fmt: skip
        end = matched.start + num_external
        chunks = self._chunks[req_id]
        tail = matched.end if matched.tail and end == matched.end else None
        reach = end + 1 if tail is not None else end
        needed = [c for c in chunks if c.start < reach and c.end > matched.start]
        trace = self._traces.get(req_id)
        self._new_loads.append(LoadPlan(req_id, needed, matched.start, end, block_ids, tail, trace))
        self._attempted.add(req_id)
        self._stored[req_id] = matched.stored_chunks
        if tail is not None:
            self._tails.add(req_id)

    def begin_step(self, idle: bool) -> StepPlan:
        """A new plan carrying the loads planned since the previous step."""
        plan = StepPlan(loads=self._new_loads, idle=idle)
        self._new_loads = []
        return plan

    def new_request(
        self,
        req_id: str,
        token_ids: Sequence[int],
        block_ids: list[int],
        num_computed: int,
        computed_after: int,
        plan: StepPlan,
    ) -> None:
        """A request scheduled for the first time (also right after its load finished)."""
        if self._extras.get(req_id, NO_EXTRAS) is None:
            return
        chunks = self.chunks_of(req_id, token_ids)
        if req_id in self._tails:
            self._tails.discard(req_id)
            last = len(token_ids) - 1
            if num_computed == last:  # the load went through: this step computes the tail
                block, offset = divmod(last, self.block_size)
                plan.tails.append(TailPlan(req_id, block_ids[block] * self.block_size + offset))
        if not self.saves:
            return
        # Chunks the store held and this engine did not have to recompute are not saved again.
        valid = sum(1 for c in chunks if c.end <= num_computed)
        skip = min(self._stored.pop(req_id, 0), valid)
        tracked = _Tracked(chunks, list(block_ids), skip, self._traces.get(req_id))
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

    def resumed(
        self, req_id: str, block_ids: list[int], computed_after: int, plan: StepPlan
    ) -> None:
        """A preempted request runs again in `block_ids`, all new (its old blocks were freed).

        Chunks saved before the preemption stay saved; the rest are saved from the new blocks as
        the engine computes them again. A tail still to patch is dropped: the loaded KV is gone.
        """
        self._tails.discard(req_id)
        tracked = self._tracked.get(req_id)
        if tracked is None:
            return
        tracked.block_ids = list(block_ids)
        self._plan_saves(req_id, tracked, computed_after, plan)

    def finished(self, req_id: str) -> None:
        for table in (
            self._chunks, self._matched, self._stored, self._tracked, self._extras, self._traces,
        ):  # fmt: skip
            table.pop(req_id, None)
        self._attempted.discard(req_id)
        self._tails.discard(req_id)

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
            last = tracked.next_chunk == len(tracked.chunks)
            saves = SavePlan(req_id, ready, list(tracked.block_ids), last, tracked.trace)
            plan.saves.append(saves)
