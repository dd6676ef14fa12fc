"""How much of a prompt's KV the store already holds, asked from the proxy.

The proxy derives the connector's own chunk keys (`connector.keys.chunk_keys`, the one shared
function) from the prompt's token ids and the engines' key identity, and asks the store for the
length of the present prefix with one batched `exists`. The identity is rebuilt here from the
checkpoint folder's config.json, without vLLM: the same model fingerprint, KV dtype, layout
(per-head K/V or an MLA latent, heads per tensor-parallel rank) and chunk size the connector
logs at startup; tests/proxy/test_routing_engine.py checks the keys against a real engine's.

The keys also carry what the engines' keys carry besides tokens (`keys.KeyExtras`): the
request's `cache_salt`, and the LoRA adapter its `model` names, with the path the engines
registered it under (`ServedModels`, from an engine's `/v1/models`). What the proxy cannot
name as the engine does (images and other non-text content, prompt embeddings) gets no keys:
the tokenizer refuses such requests and they route as if nothing were stored.

The store is asked with `touch=False`: a routing probe does not refresh the entries' LRU order.

A store that does not answer is not an error for the caller: the lookup raises
`StoreUnavailable`, the router routes as if nothing were stored, and this object stops asking
for a back-off period (doubling, capped) so a dead store costs no per-request timeout. It logs
one warning when the store goes away and one line when it is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from splitwise_local.config import SplitwiseConfig
from splitwise_local.connector.keys import (
    NO_EXTRAS,
    KeyExtras,
    KeyIdentity,
    chunk_spans,
    key_identity,
    mla_layout,
    per_head_layout,
)
from splitwise_local.store.aio import AsyncStoreClient
from splitwise_local.store.backend import KVBackend, open_backend
from splitwise_local.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def hf_config(model: str | Path) -> dict[str, Any]:
    """The checkpoint's `config.json`."""
    config: dict[str, Any] = json.loads((Path(model) / "config.json").read_text())
    return config


def kv_layout(config: dict[str, Any], tp_size: int = 1) -> str:
    """The connector's layout field for this checkpoint, as vLLM sizes its KV cache: an MLA
    latent (kv_lora_rank + rope dims) unless VLLM_MLA_DISABLE is set, else K/V per KV head of
    one tensor-parallel rank."""
    architectures = config.get("architectures") or []
    mla = any(arch in MLA_ARCHITECTURES for arch in architectures) and config.get("kv_lora_rank")
    if mla and os.environ.get("VLLM_MLA_DISABLE", "0") in ("0", ""):
        return mla_layout(config["kv_lora_rank"] + config["qk_rope_head_dim"])
    heads = config["num_attention_heads"]
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return per_head_layout(max(1, kv_heads // tp_size), head_size)


def kv_dtype(config: dict[str, Any], dtype: str) -> str:
    """The KV cache dtype the engines run with: `dtype` as given to vLLM (`--kv-cache-dtype`,
    else `--dtype`), "auto" meaning the checkpoint's own."""
    if dtype != "auto":
        return dtype
    return str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")


def engine_identity(
    model: str | Path, dtype: str, chunk_size: int, tp_size: int = 1
) -> KeyIdentity:
    """The key identity of rank 0 of an engine serving `model` (what its scheduler asks for),
    through the connector's own `key_identity`."""
    config = hf_config(model)
    return key_identity(
        model,
        dtype=kv_dtype(config, dtype),
        layout=kv_layout(config, tp_size),
        chunk_size=chunk_size,
        tp_size=tp_size,
    )


class ServedModels:
    """The `model` names the engines answer to, learnt from an engine's `/v1/models`: base
    models, and LoRA adapters (a card with a `parent`) with the path vLLM registered them
    under (the card's `root`), which its block hash and our keys cover.

    `fetch()` returns that page's JSON; a name not seen yet makes it ask again, at most every
    `refresh_s` seconds.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[dict[str, Any]]],
        refresh_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_s = refresh_s
        self._clock = clock
        self._asked_at: float | None = None
        self.base: set[str] = set()
        self.adapters: dict[str, tuple[str, str]] = {}

    async def extras(self, body: dict[str, Any]) -> KeyExtras | None:
        """The request's `KeyExtras`, None when its keys cannot be named exactly (an unknown
        model name, a salt that is not a string: the engine refuses those anyway)."""
        salt = body.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            return None
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            return None
        if model is not None and not self._knows(model) and self._may_ask():
            await self._learn()
        if model is not None and not self._knows(model):
            return None
        lora = self.adapters.get(model) if model is not None else None
        if lora is None and not salt:
            return NO_EXTRAS
        return KeyExtras(lora=lora, cache_salt=salt or None)

    def _knows(self, model: str) -> bool:
        return model in self.base or model in self.adapters

    def _may_ask(self) -> bool:
        return self._asked_at is None or self._clock() - self._asked_at >= self._refresh_s

    async def _learn(self) -> None:
        self._asked_at = self._clock()
        try:
            cards = (await self._fetch())["data"]
            base = {c["id"] for c in cards if not c.get("parent")}
            adapters = {c["id"]: (c["id"], c["root"]) for c in cards if c.get("parent")}
        except Exception as exc:  # an engine down or not vLLM: those names stay unknown
            log.info("cannot learn the engines' model names: %r", exc)
            return
        self.base, self.adapters = base, adapters


class StoredPrefix:
    """`await stored.tokens(token_ids, keys)`: how many leading prompt tokens the store holds,
    given the prompt's chunk keys (`connector.keys.chunk_keys`, which the router also uses for
    prefill affinity, so they are computed once per request)."""

    def __init__(
        self,
        identity: KeyIdentity,
        config: SplitwiseConfig,
        timeout_s: float,
        backoff_initial_s: float,
        backoff_max_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self.url = config.remote_url
        self._config = config
        self._timeout_s = timeout_s
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._clock = clock
        self._failures = 0
        self._down_until = 0.0
        # Our store (lm://, shm://) is asked through the asyncio client; other backends
        # (Mooncake) only have a sync one, run off the event loop.
        self._native = self.url.partition("://")[0] in ("lm", "shm")
        self._async: AsyncStoreClient | None = None
        self._sync: KVBackend | None = None

    @property
    def down(self) -> bool:
        """In back-off after a failure: the store is not asked until it ends."""
        return self._clock() < self._down_until

    async def tokens(self, token_ids: Sequence[int], keys: Sequence[str]) -> int:
        """Leading tokens of `token_ids` whose chunks (`keys`) are all stored; raises
        StoreUnavailable while the store is down."""
        if self.down:
            raise StoreUnavailable(f"{self.url} is marked down")
        try:
            present = await asyncio.wait_for(self._exists(keys), self._timeout_s)
        except Exception as exc:  # timeouts, refused connections, protocol errors alike
            self._failed(exc)
            raise StoreUnavailable(f"{self.url}: {exc!r}") from exc
        if self._failures:
            log.warning("store %s answers again: routing by stored KV again", self.url)
            self._failures = 0
        if not present:
            return 0
        return chunk_spans(len(token_ids), self.identity.chunk_size)[present - 1][1]

    async def close(self) -> None:
        """Closes the store client, if one was opened."""
        native, self._async = self._async, None
        sync, self._sync = self._sync, None
        if native is not None:
            await native.close()
        if sync is not None:
            await asyncio.to_thread(sync.close)

    def _failed(self, exc: BaseException) -> None:
        self._failures += 1
        initial, cap = self._backoff
        backoff = min(initial * 2 ** min(self._failures - 1, 32), cap)
        self._down_until = self._clock() + backoff
        if self._failures == 1:
            log.warning(
                "store %s unavailable (%r): auto routing sends every request through prefill "
                "until it answers (next try in %.0f s)",
                self.url, exc, backoff,
            )  # fmt: skip
        # A sync client that failed may be stuck on a broken connection: open a new one next
        # time. (The asyncio client drops broken connections itself.)
        if self._sync is not None:
            sync, self._sync = self._sync, None
            asyncio.get_running_loop().run_in_executor(None, sync.close)  # Mooncake: ~2 s

    async def _exists(self, keys: Sequence[str]) -> int:
        if self._native:
            if self._async is None:
                token = self._config.store_auth_token
                self._async = AsyncStoreClient(self.url, token, timeout=self._timeout_s)
            return await self._async.exists(list(keys), touch=False)
        if self._sync is None:
            self._sync = await asyncio.to_thread(self._open_sync)
        return await asyncio.to_thread(self._sync.exists, list(keys))

    def _open_sync(self) -> KVBackend:
        config = self._config
        # The proxy only asks; it lends the store no memory of its own.
        mooncake = config.mooncake.model_copy(update={"global_segment_size": 0})
        return open_backend(self.url, config.model_copy(update={"mooncake": mooncake}))
