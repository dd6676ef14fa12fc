"""KV-aware routing with fake engines and a real store: which path and which engine each request
takes, and how the decision shows in the `x-splitwise-route` header and /metrics.

The proxy runs with the embedded model's real tokenizer and a real store (in this process), so
token ids, chunk keys and the store's `exists` are the real ones; only the engines are fakes
(they record what they were sent). Whether the proxy's keys are the engine's own is checked
against real engines in test_routing_engine.py. These proxies run with `route_detail` on, so
the header shows each decision; without it no answer carries one.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest

from splitwise_local.connector.keys import KeyExtras
from splitwise_local.proxy.pool import least_loaded
from splitwise_local.proxy.routing import Hop, PrefixMemory, Prompt, Route, decide_auto
from splitwise_testing.scrape import total
from tests.proxy.routes import (
    CHUNK,
    LONG,
    OTHER,
    THRESHOLD,
    chat,
    route_of,
    routes_counted,
    send,
    store_prompt,
)

# -- the rule and the memory, on their own --------------------------------------------------


@pytest.mark.parametrize(
    "prompt, stored, busy, room, expected",
    [
        (40, 0, False, True, ("direct", "short_prompt")),
        (500, 480, False, True, ("direct", "stored_prefix")),
        (500, 0, False, True, ("disaggregated", "long_uncached")),
        (500, 0, True, True, ("direct", "prefill_busy")),
        (500, 0, True, False, ("disaggregated", "long_uncached")),
        (64, 0, False, True, ("disaggregated", "long_uncached")),  # the threshold is exclusive
    ],
)
def test_auto_rule(prompt, stored, busy, room, expected):
    assert decide_auto(prompt, stored, THRESHOLD, busy, room) == expected


def test_prefix_memory_counts_leading_keys_and_forgets_the_oldest():
    memory = PrefixMemory(capacity=3)
    memory.remember("a", ["k1", "k2"])
    assert memory.overlap("a", ["k1", "k2", "k3"]) == 2
    assert memory.overlap("a", ["k2"]) == 1
    assert memory.overlap("a", ["x", "k1"]) == 0  # chained keys: only a prefix counts
    assert memory.overlap("b", ["k1"]) == 0
    memory.remember("a", ["k3", "k4"])
    assert memory.overlap("a", ["k1"]) == 0  # evicted, least recently seen
    assert memory.overlap("a", ["k2", "k3", "k4"]) == 3


def test_header_names_the_path_reason_policy_tokens_and_engines():
    hop = Hop("decode", 4, least_loaded)
    route = Route("auto", "direct", "stored_prefix", Prompt(100, stored=96), hop)
    assert route.header({"decode": "http://127.0.0.1:8020"}) == (
        "path=direct; reason=stored_prefix; policy=auto; prompt_tokens=100; stored_tokens=96; "
        "decode=http://127.0.0.1:8020"
    )
    unknown = Route("always", "disaggregated", "always", Prompt(None), hop)
    assert unknown.header({}) == "path=disaggregated; reason=always; policy=always"


# -- a proxy with the real tokenizer and a real store ----------------------------------------


def pending_tokens(url: str) -> float:
    """Prompt tokens pending on all engines."""
    return total(url, "splitwise_proxy_engine_pending_tokens")


def test_auto_sends_short_prompts_straight_to_decode(routed):
    engines, url = routed()
    (prefill, _), (decode, _) = engines["prefill"][0], engines["decode"][0]
    for stream in (False, True):
        reply = send(url, chat("Hi there!", stream))
        route = route_of(reply)
        assert (route["path"], route["reason"], route["policy"]) == (
            "direct",
            "short_prompt",
            "auto",
        )
        assert int(route["prompt_tokens"]) < THRESHOLD and route["stored_tokens"] == "0"
        assert route["decode"] == engines["decode"][0][1] and "prefill" not in route
    assert prefill.record.requests == [] and len(decode.record.requests) == 2
    assert routes_counted(url, "auto", "direct", "short_prompt") == 2


def test_auto_prefills_a_new_long_prompt_and_skips_prefill_once_it_is_stored(
    routed, tokenizer, model, kv_config
):
    engines, url = routed()
    prefill = engines["prefill"][0][0]
    route = route_of(send(url, chat(LONG)))
    assert (route["path"], route["reason"]) == ("disaggregated", "long_uncached")
    assert route["prefill"] == engines["prefill"][0][1]
    assert len(prefill.record.requests) == 1

    # What a prefill engine would have stored for it (the fakes store nothing).
    tokens = store_prompt(tokenizer, model, kv_config[0], LONG)
    reply = send(url, chat(LONG, stream=True))
    route = route_of(reply)
    assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
    assert (int(route["prompt_tokens"]), int(route["stored_tokens"])) == (tokens, tokens)
    assert len(prefill.record.requests) == 1
    assert routes_counted(url, "auto", "disaggregated", "long_uncached") == 1
    assert routes_counted(url, "auto", "direct", "stored_prefix") == 1

    # A shared prefix plus a new question: the stored chunks count, the new tail is short.
    followup = chat(LONG)
    followup["messages"] += [
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "And its name?"},
    ]
    route = route_of(send(url, followup))
    assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
    # Whole chunks before the history diverged are stored (the last partial one is not).
    assert tokens - CHUNK < int(route["stored_tokens"]) <= tokens


def test_always_and_never_ignore_the_store(routed, tokenizer, model, kv_config):
    store_prompt(tokenizer, model, kv_config[0], LONG)
    for policy, path, prefilled in (("always", "disaggregated", 1), ("never", "direct", 0)):
        engines, url = routed(disagg=policy)
        for text in ("Hi there!", LONG):
            route = route_of(send(url, chat(text)))
            assert (route["path"], route["reason"], route["policy"]) == (path, policy, policy)
        assert len(engines["prefill"][0][0].record.requests) == 2 * prefilled


def test_a_request_beyond_the_tokenizer_goes_through_prefill(routed):
    _, url = routed()
    body = chat("Hi there!")
    body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    route = route_of(send(url, body))
    assert (route["path"], route["reason"]) == ("disaggregated", "tokens_unknown")
    assert "prompt_tokens" not in route


@pytest.mark.parametrize("bad_id", [10**12, 2**31, -1])
def test_a_token_id_outside_the_vocabulary_is_left_to_the_engine(routed, tokenizer, bad_id):
    """Such ids cannot be hashed into keys (int32); the engine answers them with its 400."""
    completion = {"model": "fake-model", "prompt": [1, bad_id], "max_tokens": 1}
    assert tokenizer.token_ids("/v1/completions", completion) is None
    assert tokenizer.token_ids("/v1/completions", {**completion, "prompt": [1, 2]}) == [1, 2]
    _, url = routed()
    reply = httpx.post(url + "/v1/completions", json=completion, timeout=30)
    assert reply.status_code == 200, reply.text
    assert route_of(reply)["reason"] == "tokens_unknown"


def test_a_dead_store_makes_auto_disaggregate_with_one_warning(routed, store, caplog):
    _, url = routed(backoff_initial_s=30)
    store.stop()
    caplog.set_level(logging.WARNING, logger="splitwise_local.proxy.prefix")
    for text in (LONG, "Hi there!", LONG):
        route = route_of(send(url, chat(text)))
        assert (route["path"], route["reason"]) == ("disaggregated", "store_unavailable")
    warnings = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "sends every request through prefill" in warnings[0].getMessage()
    assert routes_counted(url, "auto", "disaggregated", "store_unavailable") == 3


def test_prefill_affinity_keeps_a_prompt_on_the_engine_that_computed_it(routed):
    engines, url = routed(prefill=2)
    prefill = [engine for engine, _ in engines["prefill"]]
    for _ in range(3):
        route_of(send(url, chat(LONG)))
    # Least-loaded alone would have alternated (0, 1, 0); affinity stays on engine 0.
    assert [len(e.record.requests) for e in prefill] == [3, 0]
    route = route_of(send(url, chat(OTHER)))
    assert route["prefill"] == engines["prefill"][1][1]  # no engine holds it: the idle one

    engines, url = routed(prefill=2, prefill_policy="least_loaded")
    for _ in range(3):
        send(url, chat(LONG))
    assert [len(e.record.requests) for e, _ in engines["prefill"]] == [2, 1]


def test_saturated_prefill_sends_long_prompts_to_a_decode_engine_with_room(routed, fake):
    engines, url = routed(busy_tokens=100)
    prefill = engines["prefill"][0][0]
    prefill.behaviour.delay_s = 2.0  # a prefill that takes a while

    results: list[dict] = []

    def long_request():
        results.append(route_of(send(url, chat(LONG))))

    first = threading.Thread(target=long_request)
    first.start()
    deadline = time.monotonic() + 10
    while pending_tokens(url) == 0:  # the first one is at the prefill engine
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = route_of(send(url, chat(OTHER)))
    first.join()
    assert (results[0]["path"], results[0]["reason"]) == ("disaggregated", "long_uncached")
    assert (second["path"], second["reason"]) == ("direct", "prefill_busy")
    assert len(prefill.record.requests) == 1
    assert pending_tokens(url) == 0  # once answered, nothing stays pending


def test_decode_engines_are_picked_by_load(routed):
    engines, url = routed(decode=2)
    for _ in range(4):
        send(url, chat("Hi there!"))
    assert [len(e.record.requests) for e, _ in engines["decode"]] == [2, 2]


# -- what the keys cover besides tokens, and what answers reveal ------------------------------


def test_no_answer_reveals_the_route_unless_route_detail_is_on(routed, tokenizer, model, kv_config):
    tokens = store_prompt(tokenizer, model, kv_config[0], LONG)
    _, url = routed(route_detail=False)
    for stream in (False, True):
        reply = send(url, chat(LONG, stream))
        assert "x-splitwise-route" not in reply.headers
        assert "stored" not in str(reply.headers).lower()
        assert str(tokens) not in reply.headers.values()
    # The operator still sees every decision in /metrics.
    assert routes_counted(url, "auto", "direct", "stored_prefix") == 2
    _, detailed = routed()
    route = route_of(send(detailed, chat(LONG)))
    assert (route["reason"], int(route["stored_tokens"])) == ("stored_prefix", tokens)


@pytest.mark.parametrize(
    ("stored_as", "asked_as", "reason"),
    [
        ({"cache_salt": "tenant-a"}, {"cache_salt": "tenant-a"}, "stored_prefix"),
        ({"cache_salt": "tenant-a"}, {"cache_salt": "tenant-b"}, "long_uncached"),
        ({"cache_salt": "tenant-a"}, {}, "long_uncached"),
        ({}, {"cache_salt": "tenant-a"}, "long_uncached"),
        ({"lora": ("sql", "/adapters/sql")}, {"model": "sql"}, "stored_prefix"),
        ({"lora": ("sql", "/adapters/sql")}, {"model": "chat"}, "long_uncached"),
        ({"lora": ("sql", "/adapters/sql")}, {}, "long_uncached"),
        ({}, {"model": "sql"}, "long_uncached"),
    ],
)
def test_the_proxys_keys_are_the_connectors_for_salted_and_adapter_requests(
    routed, tokenizer, model, kv_config, stored_as, asked_as, reason
):
    """The proxy finds a prompt stored under the connector's keys for the request's salt and
    LoRA adapter (name and the path the engines list it under), and only then."""
    store_prompt(tokenizer, model, kv_config[0], LONG, KeyExtras(**stored_as))
    adapters = {"sql": "/adapters/sql", "chat": "/adapters/chat"}
    _, url = routed(adapters=adapters)
    route = route_of(send(url, {**chat(LONG), **asked_as}))
    assert route["reason"] == reason


def test_a_model_no_engine_lists_counts_nothing_as_stored(routed, tokenizer, model, kv_config):
    store_prompt(tokenizer, model, kv_config[0], LONG)  # under the base model's keys
    engines, url = routed(adapters={"sql": "/adapters/sql"})
    body = {**chat(LONG), "model": "no-such-adapter"}
    reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 404  # the engines' verdict, passed through
    assert route_of(reply)["stored_tokens"] == "0"
    assert len(engines["prefill"][0][0].record.requests) == 1  # sent through prefill (refused)


def test_routing_lookups_leave_the_stores_lru_order_alone(
    routed, tokenizer, model, kv_config, store
):
    store_prompt(tokenizer, model, kv_config[0], LONG)
    store_prompt(tokenizer, model, kv_config[0], OTHER)
    before = store.index.keys()
    _, url = routed()
    assert route_of(send(url, chat(LONG)))["reason"] == "stored_prefix"  # LONG's keys asked
    assert store.index.keys() == before  # LONG's chunks are still the next to be evicted
