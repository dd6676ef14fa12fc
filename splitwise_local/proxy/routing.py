"""Where each request goes: through a prefill engine first, or straight to a decode engine, and
to which engine of each role.

`disagg` (a setting) decides the path:
- `always`: prefill, then decode (the seed's behaviour);
- `never`: decode engines alone (they compute the prompt, loading any stored prefix);
- `auto`: per request, after Dynamo's conditional disaggregation ("isl_or_load"). With
  `uncached` = prompt tokens minus those whose KV the store already holds, the request goes
  straight to decode when `uncached < disagg_threshold_tokens` (reason `stored_prefix` when
  the store held part of it, else `short_prompt`), or when every prefill engine is saturated
  (at least `busy_tokens` prompt tokens pending) and a decode engine is not (reason
  `prefill_busy`); otherwise through
  prefill (`long_uncached`). Without token ids (a request tokens.py does not follow, no
  tokenizer) it goes through prefill (`tokens_unknown`), and likewise while the store does not
  answer (`store_unavailable`): always safe, never a failed request. A request whose keys the
  proxy cannot name as the engines do (a `model` no engine lists) counts nothing as stored.

Unlike Dynamo's rule there is no ratio condition: a short prompt with nothing stored also goes
straight to decode, because on its own a short prompt costs decode less than the hand-over.

Engines are ranked by policy (settings `prefill_policy`, `decode_policy`):
- `least_loaded`: fewest requests in flight, then fewest prompt tokens pending, then round robin;
- `kv_affinity`: least work, counting as work the tokens pending on an engine plus the prompt
  tokens its own prefix cache most likely lacks (`PrefixMemory`: the chunk keys each engine
  computed or loaded lately), then as least_loaded. Prefill defaults to it; decode engines load
  any stored prefix from the shared store, so by default they are picked by load.

Each decision is a `Decision`, counted in /metrics by policy, path and reason. The caller sees
it in the `x-splitwise-route` header only when the operator turns `route_detail` on: path,
reason and stored tokens tell whether someone else's prompt is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from splitwise_local.connector.keys import KeyIdentity, chunk_keys, chunk_spans
from splitwise_local.proxy.pool import Endpoint, EnginePool, Rank, least_loaded
from splitwise_local.proxy.prefix import ServedModels, StoredPrefix, engine_identity
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.proxy.tokens import PromptTokenizer
from splitwise_local.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-splitwise-route"
DISAGGREGATED = "disaggregated"  # prefill engine, then decode engine
DIRECT = "direct"  # decode engine alone
PREFILL_ONLY = "prefill_only"  # a prefill engine alone, while no decode engine is reachable
# Keys for engines' prefix memories when no store identity is known (no store): any chained
# digest of the tokens serves to compare prefixes.
LOCAL_IDENTITY = KeyIdentity("proxy-affinity", "", "", 256)


@dataclass
class Decision:
    """One request's routing decision and what it was based on."""

    policy: str
    path: str
    reason: str
    token_ids: list[int] | None = None
    keys: list[str] = field(default_factory=list)
    chunk_size: int = LOCAL_IDENTITY.chunk_size
    stored_tokens: int = 0
    prefill: str | None = None
    decode: str | None = None

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's length in tokens; None when the proxy could not tokenize it."""
        return None if self.token_ids is None else len(self.token_ids)

    @property
    def uncached(self) -> int:
        """Prompt tokens whose KV nobody holds (0 when the tokens are unknown)."""
        return max(0, (self.prompt_tokens or 0) - self.stored_tokens)

    def covered(self, leading_keys: int) -> int:
        """Prompt tokens covered by the first `leading_keys` chunk keys."""
        if not leading_keys or self.token_ids is None:
            return 0
        return chunk_spans(len(self.token_ids), self.chunk_size)[leading_keys - 1][1]

    def fall_back(self, reason: str) -> None:
        """Prefill did not happen after all: decode computes the prompt itself."""
        self.path, self.reason, self.prefill = DIRECT, reason, None

    def whole_on_prefill(self) -> None:
        """No decode engine can be reached: a prefill engine serves the whole request."""
        self.path, self.reason, self.decode = PREFILL_ONLY, "decode_unavailable", None

    @property
    def labels(self) -> tuple[str, str, str]:
        """The routes counter's labels: policy, path, reason."""
        return self.policy, self.path, self.reason

    def header(self) -> str:
        """`path=direct; reason=stored_prefix; policy=auto; prompt_tokens=1205; ...`"""
        fields: list[tuple[str, object]] = [
            ("path", self.path), ("reason", self.reason), ("policy", self.policy),
        ]  # fmt: skip
        if self.prompt_tokens is not None:
            fields += [("prompt_tokens", self.prompt_tokens), ("stored_tokens", self.stored_tokens)]
        fields += [(role, url) for role, url in (("prefill", self.prefill), ("decode", self.decode))
                   if url]  # fmt: skip
        return "; ".join(f"{name}={value}" for name, value in fields)


def decide_auto(
    prompt_tokens: int,
    stored_tokens: int,
    threshold: int,
    prefill_busy: bool,
    decode_has_room: bool,
) -> tuple[str, str]:
    """`auto`'s rule: (path, reason) for a prompt whose token count and stored part are known."""
    uncached = prompt_tokens - stored_tokens
    if uncached < threshold:
        return DIRECT, "stored_prefix" if stored_tokens else "short_prompt"
    if prefill_busy and decode_has_room:
        return DIRECT, "prefill_busy"
    return DISAGGREGATED, "long_uncached"


class PrefixMemory:
    """The chunk keys each engine computed or loaded lately, as an LRU of `capacity` keys per
    engine: what its own prefix cache most likely still holds."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: dict[str, OrderedDict[str, None]] = {}

    def remember(self, engine: str, keys: Sequence[str]) -> None:
        """`engine` computed or loaded these keys just now; the oldest beyond `capacity` go."""
        memory = self._keys.setdefault(engine, OrderedDict())
        for key in keys:
            memory[key] = None
            memory.move_to_end(key)
        while len(memory) > self.capacity:
            memory.popitem(last=False)

    def overlap(self, engine: str, keys: Sequence[str]) -> int:
        """How many leading `keys` the engine holds (chained keys: a prefix of them)."""
        memory = self._keys.get(engine)
        if not memory:
            return 0
        count = 0
        for key in keys:
            if key not in memory:
                break
            count += 1
        return count


class Router:
    """Decides each request's `Decision` and ranks the engines of each role for it."""

    def __init__(
        self,
        settings: ProxySettings,
        prefill: EnginePool,
        decode: EnginePool,
        tokenizer: PromptTokenizer | None = None,
        identity: KeyIdentity = LOCAL_IDENTITY,
        stored: StoredPrefix | None = None,
        models: ServedModels | None = None,
    ) -> None:
        self.settings = settings
        self.prefill = prefill
        self.decode = decode
        self.tokenizer = tokenizer
        self.identity = identity
        self.stored = stored
        self.models = models
        self.memory = PrefixMemory(settings.affinity_chunks)
        # One thread: off the event loop, and never two calls into one tokenizer at once
        # (Hugging Face's Rust tokenizers refuse concurrent use: "Already borrowed").
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="proxy-tokenize")

    async def close(self) -> None:
        """Stops the tokenizer's thread and closes the store client."""
        self._tokenizing.shutdown(wait=False)
        if self.stored is not None:
            await self.stored.close()

    def _needs_tokens(self) -> bool:
        """Token ids cost a tokenization per request; only a decision that uses them pays."""
        settings = self.settings
        if settings.disagg == "auto":
            return True
        prefill_affinity = (
            settings.prefill_policy == "kv_affinity" and len(self.prefill.endpoints) > 1
        )
        decode_affinity = settings.decode_policy == "kv_affinity" and len(self.decode.endpoints) > 1
        return decode_affinity or (prefill_affinity and settings.disagg == "always")

    async def decide(self, api_route: str, body: dict) -> Decision:
        """This request's path and why (the module's docstring); it is tokenized, and the store
        asked, only when the settings need it."""
        policy = self.settings.disagg
        token_ids = None
        if self.tokenizer is not None and self._needs_tokens():
            loop = asyncio.get_running_loop()
            token_ids = await loop.run_in_executor(
                self._tokenizing, self.tokenizer.token_ids, api_route, body
            )
        extras = None
        if token_ids and self.models is not None:
            extras = await self.models.extras(body)
        keys = chunk_keys(self.identity, token_ids, extras) if extras is not None else []
        decision = Decision(
            policy, DISAGGREGATED, policy, token_ids, keys, self.identity.chunk_size
        )
        if policy == "never":
            decision.path = DIRECT
        if policy != "auto":
            return decision
        if token_ids is None:
            decision.reason = "tokens_unknown"
            return decision
        if self.stored is not None and keys:
            try:
                decision.stored_tokens = await self.stored.tokens(token_ids, keys)
            except StoreUnavailable:
                decision.reason = "store_unavailable"
                return decision
        decision.path, decision.reason = decide_auto(
            len(token_ids),
            decision.stored_tokens,
            self.settings.disagg_threshold_tokens,
            self._prefill_busy(),
            self._decode_has_room(),
        )
        return decision

    def _prefill_busy(self) -> bool:
        up = [e for e in self.prefill.endpoints if self.prefill.is_up(e)]
        return all(e.pending_tokens >= self.settings.busy_tokens for e in up)

    def _decode_has_room(self) -> bool:
        up = [e for e in self.decode.endpoints if self.decode.is_up(e)]
        return any(e.pending_tokens < self.settings.busy_tokens for e in up)

    # -- picking engines ---------------------------------------------------------------------

    def rank_for(self, role: str, decision: Decision) -> Rank:
        """How to rank the engines of `role` ("prefill" or "decode") for this request."""
        policy = self.settings.prefill_policy if role == "prefill" else self.settings.decode_policy
        if policy == "least_loaded":
            return least_loaded
        work = self.tokens_for(role, decision)

        def affinity(e: Endpoint) -> tuple:
            cached = decision.covered(self.memory.overlap(e.url, decision.keys))
            return (e.pending_tokens + max(0, work - cached), *least_loaded(e))

        return affinity

    def tokens_for(self, role: str, decision: Decision) -> int:
        """Prompt tokens an engine of `role` computes for this request (its own cache aside):
        a prefill engine the whole prompt; a decode engine the uncached part when the request
        goes straight to it, about one token after a prefill."""
        if role == "prefill":
            return decision.prompt_tokens or 0
        return decision.uncached if decision.path == DIRECT else 0

    def served(self, engine: Endpoint, decision: Decision) -> None:
        """`engine` computed or loaded the prompt: its prefix cache holds the chunks now."""
        if decision.keys:
            self.memory.remember(engine.url, decision.keys)


def build_router(
    settings: ProxySettings,
    prefill: EnginePool,
    decode: EnginePool,
    fetch_models: Callable[[], Awaitable[dict]] | None = None,
) -> Router:
    """The router the settings describe: with the model's tokenizer and key identity when
    `model` is set, asking the store of `kv_config` when that is set too; `fetch_models`
    returns an engine's `/v1/models`, whose names (LoRA adapters) the keys cover.

    A tokenizer or config that cannot be loaded is logged and routing goes on without it
    (every auto request then goes through prefill, as `tokens_unknown`).
    """
    if settings.model is None:
        return Router(settings, prefill, decode)
    from splitwise_local.config import ConfigError, load_config

    try:
        tokenizer = PromptTokenizer(settings.model)
    except Exception as exc:
        log.warning("no tokenizer in %s (%s): routing without token ids", settings.model, exc)
        return Router(settings, prefill, decode)
    try:
        config = load_config(settings.kv_config) if settings.kv_config else None
    except ConfigError as exc:
        log.warning("cannot read %s (%s): routing without the store", settings.kv_config, exc)
        config = None
    chunk_size = config.chunk_size if config is not None else LOCAL_IDENTITY.chunk_size
    identity = engine_identity(settings.model, settings.kv_dtype, chunk_size, settings.tp_size)
    stored = None
    if config is not None:
        stored = StoredPrefix(
            identity,
            config,
            settings.store_timeout_s,
            settings.backoff_initial_s,
            settings.backoff_max_s,
        )
    log.info(
        "routing: disagg=%s threshold=%d prefill=%s decode=%s store=%s keys %s",
        settings.disagg, settings.disagg_threshold_tokens, settings.prefill_policy,
        settings.decode_policy, stored.url if stored else "none", identity,
    )  # fmt: skip
    models = ServedModels(fetch_models) if fetch_models is not None else None
    return Router(settings, prefill, decode, tokenizer, identity, stored, models)
