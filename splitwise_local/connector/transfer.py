"""Worker side: moves KV between vLLM's paged cache, the serde and the store.

Saving: `save_layer` gathers each planned chunk's rows from a layer as that layer finishes
(token-major, via the layout adapter); once the last layer is in, the chunk is encoded and put
by a background thread while the rest of the step runs. `flush` waits for those puts, so when
the engine returns the request's response every chunk is readable by any other engine.

Loading: `load` fetches a request's chunks in one batched get, checks them, and scatters their
rows into the blocks vLLM allocated. A missing or corrupt chunk never fails the request: its
tokens' blocks are reported back and vLLM recomputes them (`kv_load_failure_policy=recompute`).
With `pipelined`, the same work runs in a thread that publishes layers one by one, and the
forward waits per layer (`wait_layer`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from splitwise_local.connector.layout import KVLayout
from splitwise_local.connector.planner import ChunkRef, LoadPlan, SavePlan

logger = logging.getLogger("splitwise_local.connector")
LOSSLESS_SERDES = frozenset({"naive"})


class CorruptChunk(ValueError):
    """A stored chunk that cannot be used: bad payload, wrong shape, checksum mismatch."""


def layer_checksums(kv: torch.Tensor) -> list[str]:
    """One xxh3 digest per layer of a `[layers, kv, tokens, heads, D]` chunk."""
    data = kv.detach().to("cpu").contiguous()
    return [xxhash.xxh3_64_hexdigest(layer.view(torch.uint8).numpy()) for layer in data]


class ChunkCodec:
    """A chunk tensor <-> the bytes stored under its key (serde payload + checksums)."""

    def __init__(self, serde_name: str, options=None) -> None:
        from splitwise_local.serde import make_serde

        self.serde = make_serde(serde_name, options)
        self.lossless = serde_name in LOSSLESS_SERDES

    def encode(self, kv: torch.Tensor) -> bytes:
        meta = {"checksums": layer_checksums(kv), "lossless": self.lossless}
        return self.serde.encode(kv, meta)

    @staticmethod
    def decode(data, expected_shape: tuple[int, ...]) -> torch.Tensor:
        from splitwise_local.serde import SerdeError, decode_any

        try:
            kv, meta = decode_any(data)
        except SerdeError as exc:
            raise CorruptChunk(str(exc)) from exc
        if tuple(kv.shape) != expected_shape:
            raise CorruptChunk(f"chunk shape {tuple(kv.shape)}, expected {expected_shape}")
        if meta.get("lossless") and layer_checksums(kv) != meta.get("checksums"):
            raise CorruptChunk("chunk checksum mismatch")
        return kv


@dataclass
class TransferStats:
    """What one request moved in one step, logged as one line."""

    tokens: int = 0
    chunks: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)


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


def copies_done(cache: torch.Tensor):
    """A CUDA event after this step's device-to-host copies (None on the CPU)."""
    if cache.device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def slots_for(block_ids: Sequence[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """Cache slots of tokens [start, end) of a request whose blocks are `block_ids`."""
    tokens = torch.arange(start, end)
    blocks = torch.as_tensor(block_ids, dtype=torch.long)[tokens // block_size]
    return blocks * block_size + tokens % block_size


class KVTransfer:
    """The worker-side connector's data path for one engine (all layers of one worker)."""

    def __init__(
        self,
        backend_factory: Callable[[], object],
        codec: ChunkCodec,
        layout: KVLayout,
        caches: dict[str, torch.Tensor],
        *,
        rank: int = 0,
        pipelined: bool = False,
        verify: bool = False,
    ) -> None:
        self._backend_factory = backend_factory
        self._backend = None
        self.codec = codec
        self.layout = layout
        self.caches = caches
        self.layer_names = list(caches)
        self.layer_index = {name: i for i, name in enumerate(self.layer_names)}
        self.rank = rank  # which of each chunk's per-rank keys is ours
        self.pipelined = pipelined
        self.verify = verify
        self._staged: dict[str, list[torch.Tensor | None]] = {}
        self._save_stats: dict[str, TransferStats] = {}
        self._pending: list[Future] = []
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitwise-kv")
        self._layer_ready: dict[str, threading.Event] = {}
        self._tails: list[tuple[torch.Tensor, torch.Tensor]] = []  # (slot, rows per layer)
        self._invalid_blocks: set[int] = set()
        self._lock = threading.Lock()

    @property
    def backend(self):
        if self._backend is None:
            self._backend = self._backend_factory()
        return self._backend

    # ---- saving -------------------------------------------------------------------------

    def save_layer(self, plans: Sequence[SavePlan], layer_name: str, cache: torch.Tensor) -> None:
        index = self.layer_index[layer_name]
        for plan in plans:
            stats = self._save_stats.setdefault(plan.req_id, TransferStats())
            started = time.perf_counter()
            for chunk in plan.chunks:
                slots = slots_for(plan.block_ids, chunk.start, chunk.end, self.layout.block_size)
                key = chunk.keys[self.rank]
                staged = self._staged.setdefault(key, [None] * len(self.layer_names))
                staged[index] = to_host(self.layout.gather(cache, slots))
                if all(layer is not None for layer in staged):
                    kv = torch.stack(self._staged.pop(key))
                    copied = copies_done(cache)
                    self._pending.append(
                        self._executor.submit(self._put, plan.req_id, chunk, kv, copied)
                    )
            stats.seconds += time.perf_counter() - started

    def _put(self, req_id: str, chunk: ChunkRef, kv: torch.Tensor, copied) -> None:
        started = time.perf_counter()
        if copied is not None:
            copied.synchronize()  # the GPU-to-host copies of this chunk have landed
        payload = self.codec.encode(kv)
        self.backend.put(chunk.keys[self.rank], payload)
        logger.debug(
            "splitwise save-key req=%s tokens=%d-%d key=%s",
            req_id,
            chunk.start,
            chunk.end,
            chunk.keys[self.rank],
        )
        with self._lock:
            stats = self._save_stats[req_id]
            stats.tokens += chunk.end - chunk.start
            stats.chunks += 1
            stats.bytes += len(payload)
            stats.seconds += time.perf_counter() - started

    def flush(self) -> None:
        """Blocks until every chunk staged so far is in the store (or its put failed)."""
        pending, self._pending = self._pending, []
        errors: list[BaseException] = []
        for future in pending:
            try:
                future.result()
            except Exception as exc:  # a failed save must never fail the request
                errors.append(exc)
        if self._staged:
            logger.warning(
                "splitwise: %d chunks missed layers and were not saved", len(self._staged)
            )
            self._staged.clear()
        for req_id, stats in self._save_stats.items():
            logger.info(
                "splitwise save req=%s tokens=%d chunks=%d bytes=%d ms=%.1f",
                req_id, stats.tokens, stats.chunks, stats.bytes, stats.seconds * 1e3,
            )  # fmt: skip
        self._save_stats.clear()
        if errors:
            logger.error("splitwise: %d chunk saves failed: %s", len(errors), errors[0])

    # ---- loading ------------------------------------------------------------------------

    def start_load(self, plans: Sequence[LoadPlan]) -> None:
        self._tails = []
        if not plans:
            return
        if not self.pipelined:
            self._load(plans)
            return
        self._layer_ready = {name: threading.Event() for name in self.layer_names}
        threading.Thread(target=self._load, args=(plans,), daemon=True).start()

    def wait_layer(self, layer_name: str) -> None:
        event = self._layer_ready.get(layer_name)
        if event is not None:
            event.wait()

    def patch_tail(self, layer_name: str, cache: torch.Tensor) -> None:
        """After a layer's attention: the last prompt token's KV becomes the prefill's."""
        index = self.layer_index[layer_name]
        for slot, rows in self._tails:
            self.layout.scatter(cache, slot, rows[index])
        if index == len(self.layer_names) - 1:
            self._tails = []

    def take_invalid_blocks(self) -> set[int]:
        with self._lock:
            invalid, self._invalid_blocks = self._invalid_blocks, set()
        return invalid

    def _fetch(self, plan: LoadPlan, stats: TransferStats) -> list[torch.Tensor]:
        """The plan's chunks, decoded, up to the first one that is missing or corrupt."""
        try:
            values = self.backend.get_many([c.keys[self.rank] for c in plan.chunks])
        except Exception as exc:  # store down: load nothing, recompute everything
            stats.failed.append(f"store: {exc}")
            return []
        decoded = []
        for chunk, value in zip(plan.chunks, values, strict=True):
            if value is None:
                stats.failed.append(f"chunk {chunk.start}-{chunk.end} missing")
                break
            shape = (len(self.layer_names), self.layout.kv, chunk.end - chunk.start,
                     self.layout.heads, self.layout.head_size)  # fmt: skip
            try:
                decoded.append(self.codec.decode(value, shape))
            except CorruptChunk as exc:
                stats.failed.append(f"chunk {chunk.start}-{chunk.end}: {exc}")
                break
            stats.bytes += len(value)
        return decoded

    def _load(self, plans: Sequence[LoadPlan]) -> None:
        try:
            self._load_all(plans)
        finally:
            for event in self._layer_ready.values():
                event.set()

    def _load_all(self, plans: Sequence[LoadPlan]) -> None:
        work = []
        for plan in plans:
            stats = TransferStats()
            started = time.perf_counter()
            decoded = self._fetch(plan, stats)
            # Rows to write: each chunk's overlap with [plan.start, plan.end).
            pieces = []
            for chunk, kv in zip(plan.chunks, decoded, strict=False):
                lo, hi = max(chunk.start, plan.start), min(chunk.end, plan.end)
                slots = slots_for(plan.block_ids, lo, hi, self.layout.block_size)
                pieces.append((slots, kv[:, :, lo - chunk.start : hi - chunk.start]))
                stats.tokens += hi - lo
                stats.chunks += 1
            loaded_end = plan.start + stats.tokens
            if loaded_end < plan.end:
                self._report_unloaded(plan, loaded_end)
            elif plan.tail is not None:
                chunk, kv = next(
                    (c, kv)
                    for c, kv in zip(plan.chunks, decoded, strict=False)
                    if c.end > plan.tail
                )
                at = plan.tail - chunk.start
                slot = slots_for(plan.block_ids, plan.tail, plan.tail + 1, self.layout.block_size)
                self._tails.append((slot, kv[:, :, at : at + 1]))
            stats.seconds = time.perf_counter() - started
            work.append((plan, stats, pieces))
        for name in self.layer_names:
            index = self.layer_index[name]
            for _, stats, pieces in work:
                started = time.perf_counter()
                for slots, kv in pieces:
                    self.layout.scatter(self.caches[name], slots, kv[index])
                stats.seconds += time.perf_counter() - started
            if name in self._layer_ready:
                self._layer_ready[name].set()
        for plan, stats, pieces in work:
            verified = self._verify(pieces) if self.verify else "off"
            if stats.failed:
                logger.warning(
                    "splitwise load-partial req=%s loaded=%d of %d tokens, recomputing: %s",
                    plan.req_id, stats.tokens, plan.end - plan.start, stats.failed[0],
                )  # fmt: skip
            logger.info(
                "splitwise load req=%s tokens=%d chunks=%d bytes=%d ms=%.1f verified=%s",
                plan.req_id, stats.tokens, stats.chunks, stats.bytes, stats.seconds * 1e3, verified,
            )  # fmt: skip

    def _verify(self, pieces) -> str:
        """Reads the loaded rows back from the cache: they must equal what the store held."""
        for slots, kv in pieces:
            for index, name in enumerate(self.layer_names):
                if not torch.equal(self.layout.gather(self.caches[name], slots), kv[index]):
                    return f"MISMATCH layer={index}"
        return "ok"

    def _report_unloaded(self, plan: LoadPlan, loaded_end: int) -> None:
        """Blocks holding tokens [loaded_end, plan.end) get recomputed by vLLM."""
        size = self.layout.block_size
        first, last = loaded_end // size, (plan.end - 1) // size
        with self._lock:
            self._invalid_blocks.update(plan.block_ids[first : last + 1])

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        if self._backend is not None:
            self._backend.close()
