"""SplitwiseConnector: vLLM's KV connector API on top of our store.

vLLM creates one instance in the scheduler (role SCHEDULER: plans, never touches KV) and one
per worker (role WORKER: moves KV). The scheduler half is `Planner`, the worker half
`KVTransfer`; this class only translates vLLM's hooks into their calls. Load it with

    --kv-transfer-config '{"kv_connector": "SplitwiseConnector",
                           "kv_connector_module_path": "splitwise_local.connector",
                           "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
                           "kv_load_failure_policy": "recompute",
                           "kv_connector_extra_config": {"config_file": "cpu.yaml"}}'

The store never makes a request fail: a store that is down or a chunk that vanished means the
engine computes those tokens itself, with one warning per request.
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

from splitwise_local.config import SplitwiseConfig, load_config
from splitwise_local.connector.keys import KeyIdentity, key_identity, mla_layout, per_head_layout
from splitwise_local.connector.layout import layout_for
from splitwise_local.connector.planner import Planner, StepPlan
from splitwise_local.connector.transfer import ChunkCodec, KVTransfer

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = logging.getLogger("splitwise_local.connector")


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


def connector_config(vllm_config: VllmConfig) -> SplitwiseConfig:
    """Our YAML: kv_connector_extra_config.config_file, else the environment's config file."""
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
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
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _log_to_stdout()
        self.config = connector_config(vllm_config)
        transfer_config = vllm_config.kv_transfer_config
        self.is_producer = transfer_config.is_kv_producer
        self.is_consumer = transfer_config.is_kv_consumer
        self.block_size = vllm_config.cache_config.block_size
        self.identity = engine_key_identity(vllm_config, self.config)
        extra = transfer_config.kv_connector_extra_config or {}
        self.verify = bool(extra.get("verify_loads", False))
        self._warned: set[str] = set()
        self._planner: Planner | None = None
        self._transfer: KVTransfer | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler_backend = None
            self._planner = Planner(
                self.identity, self._exists, loads=self.is_consumer, saves=self.is_producer
            )
            logger.info("splitwise key identity %s", self.identity.describe())
        logger.info(
            "splitwise connector role=%s producer=%s consumer=%s store=%s serde=%s chunk=%d",
            role.name, self.is_producer, self.is_consumer, self.config.remote_url,
            self.config.remote_serde, self.config.chunk_size,
        )  # fmt: skip

    def _open_backend(self):
        from splitwise_local.store.backend import open_backend

        return open_backend(self.config.remote_url, self.config)

    def _exists(self, keys) -> int:
        if self._scheduler_backend is None:
            self._scheduler_backend = self._open_backend()
        return self._scheduler_backend.exists(keys)

    # ==============================
    # Worker side
    # ==============================

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_pp_group, get_tensor_model_parallel_rank

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
            use_mla=model.use_mla,
            heads=model.get_num_kv_heads(self._vllm_config.parallel_config),
            head_size=model.get_head_size(),
            block_size=self.block_size,
        )
        self._transfer = KVTransfer(
            self._open_backend,
            ChunkCodec(self.config.remote_serde, self.config.serde_options),
            layout,
            kv_caches,
            rank=rank,
            pipelined=self.config.pipelined_backend,
            verify=self.verify,
        )
        logger.info(
            "splitwise registered %d layers, layout=%s, cache shape %s %s",
            len(kv_caches), layout.name, tuple(first.shape), first.dtype,
        )  # fmt: skip

    def _plan(self) -> StepPlan:
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, SplitwiseMetadata)
        return metadata.plan

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        if self._transfer is not None and self.is_consumer:
            self._transfer.start_load(self._plan().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._transfer is not None:
            self._transfer.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        if self._transfer is None:
            return
        if self.is_consumer:
            self._transfer.patch_tail(layer_name, kv_layer)
        saves = self._plan().saves
        if self.is_producer and saves:
            self._transfer.save_layer(saves, layer_name, kv_layer)

    def wait_for_save(self) -> None:
        if self._transfer is not None and self.is_producer:
            self._transfer.flush()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._transfer.take_invalid_blocks() if self._transfer is not None else set()

    def shutdown(self) -> None:
        if self._transfer is not None:
            self._transfer.close()

    # ==============================
    # Scheduler side
    # ==============================

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int, bool]:
        assert self._planner is not None
        try:
            tokens = request.prompt_token_ids or []
            return self._planner.match(request.request_id, tokens, num_computed_tokens), False
        except Exception as exc:  # the store's errors: this request computes its prompt
            if request.request_id not in self._warned:
                self._warned.add(request.request_id)
                logger.warning(
                    "splitwise store unavailable for req=%s, computing the prompt: %s",
                    request.request_id, exc,
                )  # fmt: skip
            return 0, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        assert self._planner is not None
        self._planner.allocated(request.request_id, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._planner is not None
        plan = StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._planner.new_request(
                new.req_id,
                new.prompt_token_ids or [],
                list(new.block_ids[0]),
                new.num_computed_tokens + scheduled.get(new.req_id, 0),
                plan,
            )
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            block_ids = cached.new_block_ids[i]
            computed_after = cached.num_computed_tokens[i] + scheduled.get(req_id, 0)
            if req_id in cached.resumed_req_ids:
                # Preempted and resumed: its blocks are all new; saved chunks stay saved.
                self._planner.finished(req_id)
                continue
            self._planner.running_request(
                req_id, list(block_ids[0]) if block_ids else None, computed_after, plan
            )
        return SplitwiseMetadata(plan)

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._planner is not None:
            self._planner.finished(request.request_id)
        self._warned.discard(request.request_id)
        return False, None
