"""SplitwiseConnector: vLLM's KV connector API on top of our store.

vLLM creates one instance in the scheduler (role SCHEDULER: plans, never touches KV) and one
per worker (role WORKER: moves KV). The scheduler half is `Planner` with `StoreLookups`, the
worker half `KVLoader` and `KVSaver`; this class only translates vLLM's hooks into their calls.
Load it with

    --kv-transfer-config '{"kv_connector": "SplitwiseConnector",
                           "kv_connector_module_path": "splitwise_local.connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"config_file": "cpu.yaml"}}'

Loads are asynchronous (vLLM's `WAITING_FOR_REMOTE_KVS` protocol, see `loader.py`): the
running batch keeps decoding while a new request's KV lands. Saves leave the forward path too
(`saver.py`): the step copies its chunks out of the paged cache and a bounded queue stores them;
saves have their own store guard, so a store slow to write never turns loads off. The store
never makes a request fail and no connector error reaches vLLM: a store that is down, slow or
restarted, a chunk that vanished or was corrupted, mean the engine computes those tokens
itself, with one warning per request; each hook catches what its helpers raise. An engine that
traces (`--otlp-traces-endpoint`) gets a span per load and save of each traced request
(tracing.py).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

from splitwise_local.config import SplitwiseConfig, load_config
from splitwise_local.connector.codec import LOSSLESS_SERDES, ChunkCodec
from splitwise_local.connector.health import StoreDown, StoreGuard
from splitwise_local.connector.keys import (
    KeyIdentity,
    Uncovered,
    key_identity,
    mla_layout,
    per_head_layout,
    request_key_extras,
)
from splitwise_local.connector.layout import LayerCaches, layout_for
from splitwise_local.connector.loader import KVLoader
from splitwise_local.connector.lookups import StoreLookups
from splitwise_local.connector.metrics import Counters, SplitwisePromMetrics, SplitwiseStats
from splitwise_local.connector.planner import Planner, StepPlan
from splitwise_local.connector.saver import ANSWER_WAIT_S, QUEUE_BYTES, KVSaver
from splitwise_local.connector.tracing import ConnectorTracer, request_traceparent
from splitwise_local.store.backend import KVBackend, open_backend

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
        KVConnectorStats,
        PromMetric,
        PromMetricT,
    )
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("splitwise_local.connector")
IDLE_WAIT_S = 0.02  # an engine with nothing to run but loads sleeps this long per empty step


def _log_to_stdout() -> None:
    """vLLM configures only its own logger; give ours a handler so its lines reach the log."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("SPLITWISE_LOG_LEVEL", "INFO"))
        logger.propagate = False


class SplitwiseMetadata(KVConnectorMetadata):
    """The scheduler's plan for one step, handed to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


def transfer_config(vllm_config: VllmConfig) -> KVTransferConfig:
    """vLLM's `--kv-transfer-config`, which is what makes vLLM build a connector at all."""
    config = vllm_config.kv_transfer_config
    if config is None:
        raise ValueError("the Splitwise connector needs vLLM's --kv-transfer-config")
    return config


def connector_config(vllm_config: VllmConfig) -> SplitwiseConfig:
    """Our YAML: kv_connector_extra_config.config_file, else the environment's config file."""
    extra = transfer_config(vllm_config).kv_connector_extra_config or {}
    return load_config(extra.get("config_file"))


def engine_key_identity(
    vllm_config: VllmConfig, config: SplitwiseConfig, *, tp_rank: int = 0, pp_rank: int = 0
) -> KeyIdentity:
    """This engine's key identity, built from vLLM's config by the proxy's own function."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    if model.use_mla:
        layout = mla_layout(model.get_head_size())
    else:
        layout = per_head_layout(model.get_num_kv_heads(parallel), model.get_head_size())
    return key_identity(
        model.model,
        dtype=model.dtype if cache_dtype == "auto" else cache_dtype,
        layout=layout,
        chunk_size=config.chunk_size,
        tp_size=parallel.tensor_parallel_size,
        tp_rank=tp_rank,
        pp_size=parallel.pipeline_parallel_size,
        pp_rank=pp_rank,
    )


class SplitwiseConnector(KVConnectorBase_V1):
    """Prefill saves KV chunks to our store; decode finds them by key and loads them."""

    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig,
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_to_stdout()
        self.config = connector_config(vllm_config)
        transfer = transfer_config(vllm_config)
        self.is_producer = transfer.is_kv_producer
        self.is_consumer = transfer.is_kv_consumer
        self.block_size = vllm_config.cache_config.block_size
        self.identity = engine_key_identity(vllm_config, self.config)
        extra = transfer.kv_connector_extra_config or {}
        self.verify = bool(extra.get("verify_loads", False))
        self.save_queue_bytes = int(extra.get("save_queue_mb", QUEUE_BYTES >> 20)) << 20
        # Only a pure producer's answers wait for their saves (see saver.py).
        answer_wait_s = 0.0 if self.is_consumer else ANSWER_WAIT_S
        self.answer_wait_s = float(extra.get("save_answer_wait_s", answer_wait_s))
        # The last-token overwrite (LoadPlan.tail): only with a lossless serde, never lossy.
        lossless = self.config.remote_serde in LOSSLESS_SERDES
        self.keep_tail = lossless and bool(extra.get("keep_tail", True))
        self.counters = Counters()
        self._store: KVBackend | None = None
        self._guard = StoreGuard(f"{role.name.lower()} loads")  # saves have their own
        self._warned: set[str] = set()
        self._planner: Planner | None = None
        self._lookups: StoreLookups | None = None
        self._loader: KVLoader | None = None
        self._saver: KVSaver | None = None
        self._invalid: set[int] = set()  # blocks to report with this step's finished loads
        self._tracer: ConnectorTracer | None = None  # the workers' spans (tracing.py)
        if role == KVConnectorRole.WORKER:
            self._tracer = ConnectorTracer.from_environment()
        if role == KVConnectorRole.SCHEDULER:
            self._lookups = StoreLookups(
                lambda keys: self._backend().exists(keys),
                self._guard,
                stride=len(self.identity.all_ranks()),
            )
            self._planner = Planner(
                self.identity, self._lookups, block_size=self.block_size,
                loads=self.is_consumer, saves=self.is_producer, keep_tail=self.keep_tail,
            )  # fmt: skip
            logger.info("splitwise key identity %s", self.identity.describe())
        logger.info(
            "splitwise connector role=%s producer=%s consumer=%s store=%s serde=%s chunk=%d",
            role.name, self.is_producer, self.is_consumer, self.config.remote_url,
            self.config.remote_serde, self.config.chunk_size,
        )  # fmt: skip

    def _backend(self) -> KVBackend:
        """The store client, opened on first use (it reconnects by itself after that)."""
        if self._store is None:
            self._store = open_backend(self.config.remote_url, self.config)
        return self._store

    def _warn_once(self, req_id: str, message: str, *args: Any) -> None:
        if req_id not in self._warned:
            self._warned.add(req_id)
            logger.warning(message, req_id, *args)

    # ==============================
    # Worker side
    # ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        model = self._vllm_config.model_config
        rank = engine_key_identity(
            self._vllm_config,
            self.config,
            tp_rank=get_tensor_model_parallel_rank(),
            pp_rank=get_pp_group().rank_in_group,
        ).rank_index
        first = next(iter(kv_caches.values()))
        layout = layout_for(
            first,
            kv_cache_layout=self._vllm_config.cache_config.get_resolved_kv_cache_layout(),
            use_mla=model.use_mla,
            heads=model.get_num_kv_heads(self._vllm_config.parallel_config),
            head_size=model.get_head_size(),
            block_size=self.block_size,
        )
        caches = LayerCaches(list(kv_caches.values()))
        codec = ChunkCodec(  # seals chunks with the store's token; loads check the seal
            self.config.remote_serde,
            self.config.serde_options,
            secret=self.config.store_auth_token,
        )
        if self.is_consumer:
            self._loader = KVLoader(
                self._backend, layout, caches, rank=rank, counters=self.counters,
                guard=self._guard, verify=self.verify, codec=codec, tracer=self._tracer,
            )  # fmt: skip
        if self.is_producer:
            self._saver = KVSaver(
                self._backend, codec, layout, caches, rank=rank, counters=self.counters,
                queue_bytes=self.save_queue_bytes, answer_wait_s=self.answer_wait_s,
                guard=StoreGuard("worker saves"), tracer=self._tracer,
            )  # fmt: skip
        self._layout, self._caches = layout, caches
        logger.info(
            "splitwise registered %d layers, layout=%s, cache shape %s %s, one buffer=%s",
            len(kv_caches), layout.name, tuple(first.shape), first.dtype,
            caches.stacked is not None,
        )  # fmt: skip
        if self.config.pipelined_backend:
            logger.info("splitwise: pipelined_backend has no effect, loads are asynchronous")

    def _plan(self) -> StepPlan:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, SplitwiseMetadata)
        return metadata.plan

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self._loader is not None:
            self._loader.submit(self._plan().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Nothing to wait for: a request runs only once its whole load is in."""

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: torch.Tensor,
        attn_metadata: AttentionMetadata,
        **kwargs: Any,
    ) -> None:
        """Nothing per layer: `wait_for_save` moves every layer at once after the forward."""

    def wait_for_save(self) -> None:
        plan = self._plan()
        if self._loader is not None:
            for tail in plan.tails:
                self._patch_tail(tail.req_id, tail.slot)
        if self._saver is not None:
            try:
                self._saver.save(plan.saves)
            except Exception:  # saving is best effort: a bug here costs the cache only
                logger.exception("splitwise: saving this step's chunks failed")

    def _patch_tail(self, req_id: str, slot: int) -> None:
        """The last prompt token's KV, just computed by this engine, becomes the prefill's."""
        assert self._loader is not None
        rows = self._loader.take_tail(req_id)
        if rows is not None:
            self._layout.scatter(self._caches, torch.tensor([slot]), rows)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Loads that ended; their failed blocks go out with them (vLLM reads them next)."""
        if self._saver is not None:
            self._saver.forget(finished_req_ids)
        if self._loader is None:
            return None, None
        if self._plan().idle:
            self._loader.wait_idle(IDLE_WAIT_S)  # nothing runs but loads: let them have the core
        self._loader.forget(finished_req_ids)
        done, invalid = self._loader.finished()
        self._invalid |= invalid
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        invalid, self._invalid = self._invalid, set()
        return invalid

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.counters.take()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> SplitwiseStats:
        return SplitwiseStats(data=dict(data)) if data else SplitwiseStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type[PromMetric], type[PromMetricT]],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> SplitwisePromMetrics:
        return SplitwisePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        for part in (self._loader, self._saver, self._lookups):
            if part is not None:
                part.close()
        if self._store is not None:
            self._store.close()
        if self._tracer is not None:
            self._tracer.close()

    # ==============================
    # Scheduler side
    # ==============================

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        assert self._planner is not None
        extras = None
        try:
            extras = request_key_extras(request)
        except Uncovered as why:
            logger.info(
                "splitwise req=%s: its KV depends on %s, which the chunk keys do not cover: "
                "neither loaded nor saved", request.request_id, why,
            )  # fmt: skip
        except Exception:  # a bug of ours: this request is neither loaded nor saved
            logger.exception("splitwise keys for req=%s failed", request.request_id)
        self._planner.admit(request.request_id, extras, request_traceparent(request))
        if extras is None:
            return 0, False
        try:
            tokens = request.prompt_token_ids or []
            matched = self._planner.match(request.request_id, tokens, num_computed_tokens)
        except StoreDown as exc:
            self.counters.add(store_unavailable=1)
            self._warn_once(
                request.request_id, "splitwise store unavailable for req=%s, computing the "
                "prompt: %s", exc,
            )  # fmt: skip
            return 0, False
        except Exception:  # a bug of ours: this request computes its prompt
            logger.exception("splitwise lookup for req=%s failed", request.request_id)
            return 0, False
        return matched, bool(matched)

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._planner is not None
        if num_external_tokens > 0:
            block_ids = list(blocks.get_block_ids()[0])
            self._planner.allocated(request.request_id, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._planner is not None
        plan = self._planner.begin_step(idle=scheduler_output.total_num_scheduled_tokens == 0)
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._planner.new_request(
                new.req_id,
                new.prompt_token_ids or [],
                list(new.block_ids[0]),
                new.num_computed_tokens,
                new.num_computed_tokens + scheduled.get(new.req_id, 0),
                plan,
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            block_ids = list(new_blocks[0]) if new_blocks else None
            computed_after = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            if req_id in cached.resumed_req_ids and block_ids is not None:
                self._planner.resumed(req_id, block_ids, computed_after, plan)
                continue
            self._planner.running_request(req_id, block_ids, computed_after, plan)
        return SplitwiseMetadata(plan)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        """Blocks are freed at once: every save copied its chunks out in its step (saver.py)."""
        if self._planner is not None:
            self._planner.finished(request.request_id)
        if self._lookups is not None:
            self._lookups.forget(request.request_id)
        self._warned.discard(request.request_id)
        return False, None
