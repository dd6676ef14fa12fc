"""KV-aware routing against real vLLM CPU engines: the proxy computes what the engines compute.

One system serves the module: our store, a prefill engine (kv_producer), a decode engine
(kv_both, as the launcher runs it under auto) and a plain engine as the reference, with a proxy
in this process that has the model's tokenizer and the engines' config. It checks that
- the proxy's token ids equal the engine's own `/tokenize` on chat-template edge cases;
- the proxy's chunk keys are the connector's: after a prefill the store holds exactly them;
- under auto a new long prompt goes through prefill, the same prompt again and a long shared
  prefix with a short question go straight to decode, which loads the stored prefix (external
  hits counted) and answers what a plain engine answers; both decisions are in the header and
  in /metrics (the proxy runs with `route_detail` on);
- `cache_salt` isolates tenants across the store as vLLM's own prefix cache does: a prompt
  stored under one salt is never loaded for another, and loads again for its own.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from splitwise_local.config import SplitwiseConfig, load_config
from splitwise_local.connector.keys import KeyExtras, chunk_keys
from splitwise_local.hardware.dtype import cpu_dtype
from splitwise_local.models.checkpoint import prepare_default_model
from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.prefix import engine_identity
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.proxy.tokens import PromptTokenizer
from splitwise_local.samples import LONG_PROMPT
from splitwise_testing.system import Engine, System, start_system
from tests.engine.checks import Judged, References, first_diff
from tests.proxy.routes import route_of, routes_counted
from tests.proxy.servers import Servers

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1500)]
NEW_TOKENS = 32
CHUNK = 128
CHAT = "/v1/chat/completions"
COMPLETION = "/v1/completions"
PASSAGE = LONG_PROMPT.split("\n\n")[1]


@pytest.fixture(scope="module")
def model():
    return prepare_default_model()


@pytest.fixture(scope="module")
def system(model, tmp_path_factory) -> Iterator[System]:
    """The plain engine keeps vLLM's default prefix cache: one engine alone reuses a shared
    prefix too, and with 128-token chunks (vLLM's CPU block size) it reuses exactly the part
    the store holds, so both compute the rest in the same forward and answer the same."""
    roles = {"prefill": "prefill", "decode": "both", "plain": "plain"}
    system = start_system(
        tmp_path_factory.mktemp("routing"),
        model,
        SplitwiseConfig(chunk_size=CHUNK),
        roles,
        engine_args={"plain": ["--enable-prefix-caching"]},
    )
    yield system
    system.stop()


@pytest.fixture(scope="module")
def proxy(system, model) -> Iterator[str]:
    servers = Servers()
    settings = ProxySettings(
        prefill=[system.engines["prefill"].url],
        decode=[system.engines["decode"].url],
        model=str(model),
        kv_config=str(Path(system.supervisor.run) / "splitwise.yaml"),
        route_detail=True,
    )
    try:
        yield servers.serve(build_app(settings))
    finally:
        servers.stop()


@pytest.fixture(scope="module")
def tokenizer(model) -> PromptTokenizer:
    return PromptTokenizer(model)


def engine_tokens(engine: Engine, body: dict) -> list[int]:
    reply = httpx.post(f"{engine.url}/tokenize", json={"model": engine.model, **body}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["tokens"]


LONG_TURN = PASSAGE  # ~1,050 tokens in one message
EDGE_CASES: dict[str, tuple[str, dict]] = {
    "one user turn": (CHAT, {"messages": [{"role": "user", "content": "Hi!"}]}),
    "system prompt": (
        CHAT,
        {
            "messages": [
                {"role": "system", "content": "You answer in French."},
                {"role": "user", "content": "Where is Paris?"},
            ]
        },
    ),
    "multi-turn": (
        CHAT,
        {
            "messages": [
                {"role": "user", "content": "Name a bridge."},
                {"role": "assistant", "content": "The Golden Gate Bridge."},
                {"role": "user", "content": "How long is it?"},
            ]
        },
    ),
    "unicode": (
        CHAT,
        {
            "messages": [
                {"role": "user", "content": "Grüße aus Zürich 🌉, 旧金山, café ﬁ e\u0301 \t\n"}
            ]
        },
    ),
    "content parts": (
        CHAT,
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "first"},
                        {"type": "text", "text": "second"},
                    ],
                }
            ]
        },
    ),
    "named speaker, empty content": (
        CHAT,
        {"messages": [{"role": "user", "name": "ann", "content": ""}]},
    ),
    "no generation prompt": (
        CHAT,
        {"messages": [{"role": "user", "content": "Hi!"}], "add_generation_prompt": False},
    ),
    "continue the final message": (
        CHAT,
        {
            "messages": [
                {"role": "user", "content": "Count to three."},
                {"role": "assistant", "content": "One, two,"},
            ],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
    ),
    "very long turn": (CHAT, {"messages": [{"role": "user", "content": LONG_TURN}]}),
    "completion": (COMPLETION, {"prompt": " The capital of France is"}),
    "completion with template text": (COMPLETION, {"prompt": "<|im_start|>user\nHi<|im_end|>"}),
    "completion without special tokens": (
        COMPLETION,
        {"prompt": "Hello", "add_special_tokens": False},
    ),
}


@pytest.mark.parametrize("case", EDGE_CASES, ids=list(EDGE_CASES))
def test_proxy_token_ids_are_the_engines(system, tokenizer, case):
    route, body = EDGE_CASES[case]
    ours = tokenizer.token_ids(route, {"model": "m", **body})
    assert ours is not None
    assert ours == engine_tokens(system.engines["decode"], body)


def chat_body(model: str, messages: list[dict], stream: bool = False) -> dict:
    return {"model": model, "messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": stream}  # fmt: skip


def answer_tokens(reply: httpx.Response) -> list[int]:
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["token_ids"]


def streamed_ids(text: str) -> list[int]:
    ids = []
    for event in text.split("\n\n"):
        data = event.removeprefix("data: ").strip()
        if data and data != "[DONE]":
            for choice in json.loads(data)["choices"]:
                ids += choice.get("token_ids") or []
    return ids


def plain_answer(engine: Engine, body: dict, after: dict | None = None) -> list[int]:
    """The plain engine's answer, its prefix cache holding only `after`'s prompt (a fresh
    cache salt keeps every other request's blocks out)."""
    salt = uuid.uuid4().hex
    if after is not None:
        answer_tokens(
            httpx.post(engine.url + CHAT, json={**after, "cache_salt": salt}, timeout=600)
        )
    return answer_tokens(
        httpx.post(engine.url + CHAT, json={**body, "cache_salt": salt}, timeout=600)
    )


@pytest.fixture(scope="module")
def references(system) -> Iterator[References]:
    """The plain engine's answers; an unstable prompt is left out, and the module fails at its
    end if more than one of its three prompts was: a near-tie is rare, and with two left out
    too little was judged to call decode's answers a plain engine's."""
    references = References(system.engines["plain"])
    yield references
    judged = Judged(allowed_out=1)
    for key, tokens in references.cache.items():
        judged.record(key, tokens is not None)
    judged.check()


def test_stored_prompts_go_straight_to_decode_and_answer_like_a_plain_engine(
    system, proxy, tokenizer, references
):
    model = system.engines["decode"].model
    decode = system.engines["decode"]
    config = load_config(Path(system.supervisor.run) / "splitwise.yaml")
    identity = engine_identity(model, cpu_dtype().dtype, config.chunk_size)
    store = system.backend()
    hits = "vllm:external_prefix_cache_hits_total"
    messages = [{"role": "user", "content": LONG_PROMPT}]
    body = chat_body(model, messages)
    ids = tokenizer.token_ids(CHAT, body)
    keys = chunk_keys(identity, ids)

    # A new long prompt: through prefill, whose connector stores exactly the proxy's keys.
    assert store.exists(keys) == 0
    reply = httpx.post(proxy + CHAT, json=body, timeout=600)
    route = route_of(reply)
    assert (route["path"], route["reason"]) == ("disaggregated", "long_uncached")
    assert int(route["prompt_tokens"]) == len(ids) == reply.json()["usage"]["prompt_tokens"]
    assert store.exists(keys) == len(keys)

    # The same prompt again: straight to decode, which loads all but the last token.
    before = decode.metric(hits)
    reply = httpx.post(proxy + CHAT, json=body, timeout=600)
    route = route_of(reply)
    assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
    assert int(route["stored_tokens"]) == len(ids)
    assert decode.metric(hits) - before == len(ids) - 1
    plain = references.tokens("long", lambda engine: plain_answer(engine, body))
    if plain is not None:
        got = answer_tokens(reply)
        assert got == plain, f"first difference at token {first_diff(got, plain)}"

    # A long shared prefix and a short question: the stored chunks load, decode computes the
    # rest; a plain engine reuses the same prefix from its own cache and computes the same rest.
    followup = [
        *messages,
        {"role": "assistant", "content": "It was destroyed by an earthquake and rebuilt."},
        {"role": "user", "content": "Which bridge opened in 1937?"},
    ]
    first, body = body, chat_body(model, followup, stream=True)
    before = decode.metric(hits)
    with httpx.stream("POST", proxy + CHAT, json=body, timeout=600) as reply:
        route = route_of(reply)
        streamed_tokens = streamed_ids(reply.read().decode())
    assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
    stored = int(route["stored_tokens"])
    assert len(ids) - config.chunk_size < stored <= len(ids)
    assert decode.metric(hits) - before == stored
    whole = {**body, "stream": False}
    plain = references.tokens("followup", lambda engine: plain_answer(engine, whole, first))
    if plain is not None:
        assert streamed_tokens == plain, f"first difference at {first_diff(streamed_tokens, plain)}"
    # The decode engine saved what it computed (kv_both): now the whole follow-up is stored.
    reply = httpx.post(proxy + CHAT, json=whole, timeout=600)
    route = route_of(reply)
    assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
    assert int(route["stored_tokens"]) == int(route["prompt_tokens"])
    if plain is not None:
        got = answer_tokens(reply)
        assert got == plain, f"first difference at token {first_diff(got, plain)}"

    assert routes_counted(proxy, "auto", "disaggregated", "long_uncached") == 1
    assert routes_counted(proxy, "auto", "direct", "stored_prefix") == 3
    store.close()


def test_a_prompt_stored_under_one_cache_salt_is_never_loaded_under_another(
    system, proxy, tokenizer, references
):
    """Salt A through the system, then the same tokens with salt B straight to decode: nothing
    is loaded (vLLM's external hit counter stays) and the answer is a plain engine's; salt A
    again finds its own KV, through the proxy's keys for a salted request."""
    model = system.engines["decode"].model
    decode = system.engines["decode"]
    config = load_config(Path(system.supervisor.run) / "splitwise.yaml")
    identity = engine_identity(model, cpu_dtype().dtype, config.chunk_size)
    hits = "vllm:external_prefix_cache_hits_total"
    body = chat_body(model, [{"role": "user", "content": PASSAGE[:1400]}])
    ids = tokenizer.token_ids(CHAT, body)
    assert len(ids) > 2 * config.chunk_size
    tenant_a, tenant_b = (f"tenant-{uuid.uuid4().hex}" for _ in range(2))

    route = route_of(httpx.post(proxy + CHAT, json={**body, "cache_salt": tenant_a}, timeout=600))
    assert (route["path"], route["reason"]) == ("disaggregated", "long_uncached")

    before = decode.metric(hits)
    salted_b = {**body, "cache_salt": tenant_b}
    answer_b = answer_tokens(httpx.post(decode.url + CHAT, json=salted_b, timeout=600))
    assert decode.metric(hits) == before  # A's KV was there, and B loaded none of it
    plain = references.tokens("salted", lambda engine: plain_answer(engine, body))
    if plain is not None:
        assert answer_b == plain, f"first difference at token {first_diff(answer_b, plain)}"

    # The store holds A's chunks under A's keys only (and now B's, which decode saved).
    store = system.backend()
    for salt in (tenant_a, tenant_b):
        keys = chunk_keys(identity, ids, KeyExtras(cache_salt=salt))
        assert store.exists(keys) == len(keys)
    assert store.exists(chunk_keys(identity, ids)) == 0

    before = decode.metric(hits)
    reply = httpx.post(proxy + CHAT, json={**body, "cache_salt": tenant_a}, timeout=600)
    route = route_of(reply)
    assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
    assert int(route["stored_tokens"]) == len(ids)
    assert decode.metric(hits) - before == len(ids) - 1
    if plain is not None:
        got = answer_tokens(reply)
        assert got == plain, f"first difference at token {first_diff(got, plain)}"
