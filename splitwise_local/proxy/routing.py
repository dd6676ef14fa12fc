"""Where each request goes, decided once: an immutable `Route` that forward.py carries out.

A route names its path, the engine request of each hop (the role, how that role's engines are
ranked for it, the prompt tokens the chosen engine computes) and the routes to take instead when
a hop fails. Paths:
- `disaggregated`: a prefill engine computes the prompt's KV (a one-token copy of the request),
  then a decode engine loads it and answers;
- `direct`: a decode engine alone (it computes the prompt, loading any stored prefix);
- `prefill_only`: a prefill engine, a complete vLLM engine, answers the whole request, while no
  decode engine is up (setting `fallback_to_prefill`).

`disagg` (a setting) decides the path:
- `always`: prefill, then decode;
- `never`: decode engines alone;
- `auto`: per request, after Dynamo's conditional disaggregation ("isl_or_load"). With
  `uncached` = prompt tokens minus those whose KV the store already holds, the request goes
  straight to decode when `uncached < disagg_threshold_tokens` (reason `stored_prefix` when
  the store held part of it, else `short_prompt`), or when every prefill engine is saturated
  (at least `busy_tokens` prompt tokens pending) and a decode engine is not (reason
  `prefill_busy`); otherwise through prefill (`long_uncached`). A request that would go
  straight to decode goes through prefill instead (`itl_objective`) when computing it there
  would stall that engine's running streams past `itl_objective_ms` (below). Without token ids
  (a request tokens.py does not follow, no tokenizer) it goes through prefill
  (`tokens_unknown`), and likewise while the store does not answer (`store_unavailable`):
  always safe, never a failed request. A request whose keys the proxy cannot name as the
  engines do (a `model` no engine lists) counts nothing as stored.

Unlike Dynamo's rule there is no ratio condition: a short prompt with nothing stored also goes
straight to decode, because on its own a short prompt costs decode less than the hand-over.

The ITL objective (`itl_objective_ms`, 0: off), after DistServe's point that prefill work placed
on a decode engine is paid by every stream there: a decode engine computes a prompt between two
steps of its running streams, one step taking up to `busy_tokens` prompt tokens (vLLM's
`max_num_batched_tokens`, chunked prefill), so those streams wait about
`per-token cost x min(tokens pending there + the prompt's uncached tokens, busy_tokens)` for
their next token (`stall_s`). The per-token cost is learned from the engines' answers
(engine_load.PrefillCost). A decode engine keeps the objective for a prompt when it runs no
stream or that wait fits the objective (`keeps_itl`); unmeasured, only an engine without
streams does. Streams are the requests the proxy has in flight there, and, when that count is
zero and the prompt would not fit, those the engine itself reports running or waiting (vLLM's
/metrics: streams other clients or proxies sent). The prompt goes direct only while some
decode engine keeps the objective, and to such an engine first; otherwise it queues at
prefill, where admission may refuse it. `never` and the fallbacks after a failed hop do not
look at it: the operator or the failure chose the engine.

The fallbacks are part of the route: a failed prefill hands the prompt to decode
(`prefill_failed`, setting `fallback_to_decode`), and a decode pool with no engine to reach
hands the whole request to a prefill engine (`decode_unavailable`, `fallback_to_prefill`).

Engines are ranked by policy (settings `prefill_policy`, `decode_policy`):
- `least_loaded`: fewest requests in flight, then fewest prompt tokens pending, then round robin;
- `kv_affinity`: least work, counting as work the tokens pending on an engine plus the prompt
  tokens its own prefix cache most likely lacks (`PrefixMemory`: the chunk keys each engine
  computed or loaded lately, told by the forwarder once the request is served), then as
  least_loaded. Prefill defaults to it; decode engines load any stored prefix from the shared
  store, so by default they are picked by load.

Each route taken is counted in /metrics by policy, path and reason. The caller sees it in the
`x-splitwise-route` header only when the operator turns `route_detail` on: path, reason and
stored tokens tell whether someone else's prompt is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from splitwise_local.config import ConfigError, SplitwiseConfig, load_config
from splitwise_local.connector.keys import KeyIdentity, chunk_keys, chunk_spans
from splitwise_local.proxy.engine_load import EngineRequests, PrefillCost
from splitwise_local.proxy.pool import Endpoint, EnginePool, Rank, Role, least_loaded
from splitwise_local.proxy.prefix import ServedModels, StoredPrefix, engine_identity
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.proxy.tokens import PromptTokenizer
from splitwise_local.store.errors import StoreUnavailable

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-splitwise-route"
DISAGGREGATED = "disaggregated"  # prefill engine, then decode engine
DIRECT = "direct"  # decode engine alone
PREFILL_ONLY = "prefill_only"  # a prefill engine alone, while no decode engine is reachable
ITL_OBJECTIVE = "itl_objective"  # through prefill: decode's streams would wait too long
# Keys for engines' prefix memories when no store identity is known (no store): any chained
# digest of the tokens serves to compare prefixes.
LOCAL_IDENTITY = KeyIdentity("proxy-affinity", "", "", 256)
Json = dict[str, Any]


@dataclass(frozen=True)
class Prompt:
    """What the router knows of a request's prompt."""

    tokens: int | None  # its length in tokens; None when the proxy did not tokenize it
    stored: int = 0  # leading tokens whose KV the store holds
    keys: tuple[str, ...] = ()  # its chunk keys; empty when they cannot be named
    chunk_size: int = LOCAL_IDENTITY.chunk_size

    @property
    def uncached(self) -> int:
        """Prompt tokens whose KV nobody holds (0 when the tokens are unknown)."""
        return max(0, (self.tokens or 0) - self.stored)

    def covered(self, leading_keys: int) -> int:
        """Prompt tokens covered by the first `leading_keys` chunk keys."""
        if not leading_keys or self.tokens is None:
            return 0
        return chunk_spans(self.tokens, self.chunk_size)[leading_keys - 1][1]


@dataclass(frozen=True)
class Hop:
    """One engine request of a route: the role it goes to, how that role's engines rank for it,
    and the prompt tokens the chosen engine computes (its own cache aside; 0 when unknown).
    `prompt` is the route's: with the answer's time it tells what a token costs there."""

    role: Role
    tokens: int
    rank: Rank
    prompt: Prompt = Prompt(None)


@dataclass(frozen=True)
class Route:
    """One request's route: its path and why, the hops, and the routes to take instead."""

    policy: str
    path: str
    reason: str
    prompt: Prompt
    generate: Hop  # the engine request whose answer the caller gets
    prefill: Hop | None = None  # before it, on the disaggregated path: the one-token copy
    if_prefill_fails: Route | None = None  # None: the prefill failure is the answer
    if_decode_unreachable: Route | None = None  # None: the decode failure is the answer

    @property
    def labels(self) -> tuple[str, str, str]:
        """The routes counter's labels: policy, path, reason."""
        return self.policy, self.path, self.reason

    def header(self, engines: Mapping[Role, str]) -> str:
        """`path=direct; reason=stored_prefix; policy=auto; prompt_tokens=1205; ...`, with the
        URL of each engine (by role) that served the request."""
        fields: list[tuple[str, object]] = [
            ("path", self.path), ("reason", self.reason), ("policy", self.policy),
        ]  # fmt: skip
        if self.prompt.tokens is not None:
            fields += [("prompt_tokens", self.prompt.tokens), ("stored_tokens", self.prompt.stored)]
        fields += [(role, engines[role]) for role in ("prefill", "decode") if role in engines]
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


@dataclass(frozen=True)
class DecodeLoad:
    """What the ITL rule knows of one decode engine."""

    streams: int  # requests generating there
    pending_tokens: int  # prompt tokens sent to it that it has not answered yet
    per_token_s: float | None  # its measured seconds per prompt token; None: not measured


def stall_s(engine: DecodeLoad, tokens: int, step_tokens: int) -> float | None:
    """The longest wait between two tokens the engine's streams would see while it computes
    `tokens` more prompt tokens: one engine step computes up to `step_tokens` of them, and
    those pending there already may share it. None while the cost is unmeasured."""
    if engine.per_token_s is None:
        return None
    return engine.per_token_s * min(engine.pending_tokens + tokens, step_tokens)


def keeps_itl(engine: DecodeLoad, tokens: int, step_tokens: int, objective_s: float) -> bool:
    """Whether the engine may compute `tokens` prompt tokens without its streams waiting longer
    than `objective_s` between two tokens (an engine without streams always may)."""
    if engine.streams == 0:
        return True
    stall = stall_s(engine, tokens, step_tokens)
    return stall is not None and stall <= objective_s


def preferring(first: frozenset[str], rank: Rank) -> Rank:
    """`rank`, with the engines in `first` ahead of the others."""

    def ranked(e: Endpoint) -> tuple[int, ...]:
        return (e.url not in first, *rank(e))

    return ranked


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
    """Decides each request's `Route`; hears from the forwarder how long each engine took to
    answer a prompt, and once per request which engines served it."""

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
        self.cost = PrefillCost()
        self.engine_requests = EngineRequests(settings.health_timeout_s)
        # One thread: off the event loop, and never two calls into one tokenizer at once
        # (Hugging Face's Rust tokenizers refuse concurrent use: "Already borrowed").
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="proxy-tokenize")

    async def close(self) -> None:
        """Stops the tokenizer's thread and closes the store client."""
        self._tokenizing.shutdown(wait=False)
        await self.engine_requests.close()
        if self.stored is not None:
            await self.stored.close()

    def generating_pool(self) -> EnginePool:
        """The decode engines, or the prefill engines while no decode engine is in rotation
        (and the proxy is allowed to fall back)."""
        if self.settings.fallback_to_prefill and not self.decode.any_available():
            return self.prefill
        return self.decode

    async def route(self, api_route: str, body: Json) -> Route:
        """This request's route and why (the module's docstring); it is tokenized, and the store
        asked, only when the settings need it."""
        policy = self.settings.disagg
        token_ids = await self._token_ids(api_route, body)
        count = None if token_ids is None else len(token_ids)
        prompt = Prompt(count, chunk_size=self.identity.chunk_size)
        if token_ids:
            prompt = replace(prompt, keys=await self._keys(token_ids, body))
        if policy != "auto":
            return self._route(DIRECT if policy == "never" else DISAGGREGATED, policy, prompt)
        if token_ids is None:
            return self._route(DISAGGREGATED, "tokens_unknown", prompt)
        if self.stored is not None and prompt.keys:
            try:
                stored = await self.stored.tokens(token_ids, prompt.keys)
            except StoreUnavailable:
                return self._route(DISAGGREGATED, "store_unavailable", prompt)
            prompt = replace(prompt, stored=stored)
        path, reason = decide_auto(
            len(token_ids),
            prompt.stored,
            self.settings.disagg_threshold_tokens,
            self._prefill_busy(),
            self._decode_has_room(),
        )
        if path == DIRECT and self.settings.itl_objective_ms:
            keeping = await self._keeping_itl(prompt.uncached)
            if not keeping:
                return self._route(DISAGGREGATED, ITL_OBJECTIVE, prompt)
            return self._route(DIRECT, reason, prompt, keeping)
        return self._route(path, reason, prompt)

    def answered(self, engine: Endpoint, hop: Hop, seconds: float) -> None:
        """The forwarder's report: `engine` answered `hop` (its first token) after `seconds`. A
        hop that computed its prompt's tokens tells what a token costs there; one that loaded a
        stored prefix does not (the load took part of the time)."""
        prompt = hop.prompt
        if hop.tokens <= 0 or prompt.tokens is None or (hop.role == "decode" and prompt.stored):
            return
        cached = prompt.covered(self.memory.overlap(engine.url, prompt.keys))
        self.cost.learn(engine.url, min(hop.tokens, prompt.tokens - cached), seconds)

    def served(self, route: Route, engines: Iterable[Endpoint]) -> None:
        """The forwarder's report: these engines computed or loaded the route's prompt, so their
        prefix caches hold its chunks now."""
        if route.prompt.keys:
            for engine in engines:
                self.memory.remember(engine.url, route.prompt.keys)

    # -- what the route rests on -------------------------------------------------------------

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

    async def _token_ids(self, api_route: str, body: Json) -> list[int] | None:
        if self.tokenizer is None or not self._needs_tokens():
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizing, self.tokenizer.token_ids, api_route, body
        )

    async def _keys(self, token_ids: list[int], body: Json) -> tuple[str, ...]:
        """The prompt's chunk keys as the engines name them; none when the request's extras
        (LoRA adapter, salt) cannot be named exactly."""
        extras = await self.models.extras(body) if self.models is not None else None
        return () if extras is None else tuple(chunk_keys(self.identity, token_ids, extras))

    def _prefill_busy(self) -> bool:
        up = [e for e in self.prefill.endpoints if self.prefill.is_up(e)]
        return all(e.pending_tokens >= self.settings.busy_tokens for e in up)

    def _decode_has_room(self) -> bool:
        up = [e for e in self.decode.endpoints if self.decode.is_up(e)]
        return any(e.pending_tokens < self.settings.busy_tokens for e in up)

    async def _keeping_itl(self, tokens: int) -> frozenset[str]:
        """The decode engines (URLs) that may compute `tokens` prompt tokens and keep the ITL
        objective. One the proxy sends nothing to is asked for its own count of requests, but
        only when the prompt would stall streams it had."""
        objective_s, step = self.settings.itl_objective_ms / 1e3, self.settings.busy_tokens
        keeping: set[str] = set()
        unsure: list[Endpoint] = []
        for e in self.decode.endpoints:
            if not self.decode.is_up(e):
                continue
            load = DecodeLoad(max(e.in_flight, 1), e.pending_tokens, self.cost.per_token_s(e.url))
            if keeps_itl(load, tokens, step, objective_s):
                keeping.add(e.url)
            elif e.in_flight == 0:
                unsure.append(e)
        counts = await asyncio.gather(*(self.engine_requests.count(e.url) for e in unsure))
        keeping.update(e.url for e, count in zip(unsure, counts, strict=True) if not count)
        return frozenset(keeping)

    # -- the route and its fallbacks ---------------------------------------------------------

    def _route(
        self, path: str, reason: str, prompt: Prompt, keeping: frozenset[str] | None = None
    ) -> Route:
        """The route along `path`, with the fallbacks the settings allow; a direct one to the
        decode engines in `keeping` first, when given."""
        policy = self.settings.disagg
        whole = None
        if self.settings.fallback_to_prefill:
            whole_hop = self._hop("prefill", prompt, PREFILL_ONLY)
            whole = Route(policy, PREFILL_ONLY, "decode_unavailable", prompt, whole_hop)
            if self.generating_pool() is self.prefill:  # no decode engine up: no split either
                return whole
        direct_hop = self._hop("decode", prompt, DIRECT)
        if path == DIRECT:
            if keeping is not None:
                direct_hop = replace(direct_hop, rank=preferring(keeping, direct_hop.rank))
            return Route(policy, DIRECT, reason, prompt, direct_hop, if_decode_unreachable=whole)
        instead = None
        if self.settings.fallback_to_decode:
            instead = Route(
                policy, DIRECT, "prefill_failed", prompt, direct_hop, if_decode_unreachable=whole
            )
        return Route(
            policy, DISAGGREGATED, reason, prompt,
            generate=self._hop("decode", prompt, DISAGGREGATED),
            prefill=self._hop("prefill", prompt, DISAGGREGATED),
            if_prefill_fails=instead,
            if_decode_unreachable=whole,
        )  # fmt: skip

    def _hop(self, role: Role, prompt: Prompt, path: str) -> Hop:
        """A hop to `role` on `path`: a prefill engine computes the whole prompt; a decode engine
        the uncached part when the request goes straight to it, about one token after a
        prefill."""
        if role == "prefill":
            tokens = prompt.tokens or 0
        else:
            tokens = prompt.uncached if path == DIRECT else 0
        return Hop(role, tokens, self._rank(role, prompt, tokens), prompt)

    def _rank(self, role: Role, prompt: Prompt, work: int) -> Rank:
        """How to rank the engines of `role` for a hop that computes `work` prompt tokens."""
        policy = self.settings.prefill_policy if role == "prefill" else self.settings.decode_policy
        if policy == "least_loaded":
            return least_loaded
        memory = self.memory

        def affinity(e: Endpoint) -> tuple[int, ...]:
            cached = prompt.covered(memory.overlap(e.url, prompt.keys))
            return (e.pending_tokens + max(0, work - cached), *least_loaded(e))

        return affinity


def build_router(
    settings: ProxySettings,
    prefill: EnginePool,
    decode: EnginePool,
    fetch_models: Callable[[], Awaitable[Json]] | None = None,
) -> Router:
    """The router the settings describe: with the model's tokenizer and key identity when
    `model` is set, asking the store of `kv_config` when that is set too; `fetch_models`
    returns an engine's `/v1/models`, whose names (LoRA adapters) the keys cover.

    A tokenizer or config that cannot be loaded is logged and routing goes on without it
    (every auto request then goes through prefill, as `tokens_unknown`).
    """
    if settings.model is None:
        return Router(settings, prefill, decode)
    try:
        tokenizer = PromptTokenizer(settings.model)
    except Exception as exc:
        log.warning("no tokenizer in %s (%s): routing without token ids", settings.model, exc)
        return Router(settings, prefill, decode)
    config: SplitwiseConfig | None = None
    try:
        config = load_config(settings.kv_config) if settings.kv_config else None
    except ConfigError as exc:
        log.warning("cannot read %s (%s): routing without the store", settings.kv_config, exc)
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
