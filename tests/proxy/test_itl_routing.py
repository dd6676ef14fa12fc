"""auto's ITL objective: a prompt goes straight to a decode engine only while that engine's
running streams would not wait longer than `itl_objective_ms` for it.

First the rule on its own (stall estimate, chunking, the cost learned from answers, vLLM's
request gauges); then a router over engine pools whose state the tests set, with measurements
told as the forwarder tells them; then whole proxies in front of fake engines, where the
measurements come from the engines' answers and the streams are real ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import httpx
import pytest

from splitwise_local.proxy.engine_load import MIN_SAMPLE_TOKENS, PrefillCost, requests_in
from splitwise_local.proxy.pool import EnginePool, least_loaded
from splitwise_local.proxy.routing import (
    DecodeLoad,
    Hop,
    Prompt,
    Route,
    Router,
    keeps_itl,
    stall_s,
)
from splitwise_local.proxy.settings import ProxySettings
from splitwise_testing.scrape import total
from tests.proxy.routes import LONG, OTHER, chat, route_of, send

T = TypeVar("T")
OBJECTIVE_S = 0.1
STEP = 4096  # tokens one engine step computes (busy_tokens)

# -- the rule on its own ---------------------------------------------------------------------


def test_a_long_prompt_would_stall_a_streaming_engine_a_short_one_would_not():
    streaming = DecodeLoad(streams=1, pending_tokens=0, per_token_s=0.002)
    assert not keeps_itl(streaming, 1500, STEP, OBJECTIVE_S)  # 3 s between two tokens
    assert keeps_itl(streaming, 40, STEP, OBJECTIVE_S)  # 80 ms
    assert keeps_itl(DecodeLoad(0, 0, 0.002), 1500, STEP, OBJECTIVE_S)  # nobody waits


def test_an_unmeasured_engine_takes_prompts_only_without_streams():
    assert not keeps_itl(DecodeLoad(1, 0, None), 1, STEP, OBJECTIVE_S)
    assert keeps_itl(DecodeLoad(0, 0, None), 1500, STEP, OBJECTIVE_S)


def test_the_stall_is_one_step_of_chunked_prefill_shared_with_pending_prompts():
    engine = DecodeLoad(streams=1, pending_tokens=0, per_token_s=0.001)
    assert stall_s(engine, 1500, STEP) == pytest.approx(1.5)
    assert stall_s(engine, 10_000, STEP) == pytest.approx(4.096)  # one chunk per step
    assert stall_s(DecodeLoad(1, 60, 0.001), 50, STEP) == pytest.approx(0.11)
    assert not keeps_itl(DecodeLoad(1, 60, 0.001), 50, STEP, OBJECTIVE_S)
    assert keeps_itl(DecodeLoad(1, 0, 0.001), 50, STEP, OBJECTIVE_S)
    # A small step bounds the stall whatever the prompt's length.
    assert keeps_itl(DecodeLoad(1, 0, 0.001), 10_000, 64, OBJECTIVE_S)


def test_the_cost_is_the_median_of_an_engines_answers_else_of_all_engines():
    cost = PrefillCost()
    assert cost.per_token_s("d") is None
    cost.learn("p", 1000, 2.0)
    assert cost.per_token_s("d") == pytest.approx(0.002)  # no sample of its own: the others'
    cost.learn("d", MIN_SAMPLE_TOKENS - 1, 10.0)  # mostly fixed costs: not a sample
    assert cost.per_token_s("d") == pytest.approx(0.002)
    for seconds in (0.1, 0.1, 50.0):  # one answer far off (queued behind others)
        cost.learn("d", 100, seconds)
    assert cost.per_token_s("d") == pytest.approx(0.001)
    assert cost.per_token_s("p") == pytest.approx(0.002)


def test_vllms_running_and_waiting_gauges_are_read_and_their_split_is_not_counted_twice():
    page = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 1.0
vllm:generation_tokens_total{engine="0",model_name="m"} 99.0
"""
    assert requests_in(page) == 3
    assert requests_in("splitwise_proxy_requests_total 4.0\n") is None


# -- a router over pools whose state the tests set ----------------------------------------------


@pytest.fixture
def router_for(model, tokenizer, fake):
    """`run(scenario, **settings)`: runs `scenario(router, prefill, decode)` on one event loop,
    with a router (the real tokenizer, no store) over one prefill engine and fake decode
    engines (they report their own running requests: none)."""

    def run(
        scenario: Callable[[Router, EnginePool, EnginePool], Awaitable[T]],
        decode: int = 1,
        **settings: object,
    ) -> T:
        urls = [fake(name=f"decode{i}")[1] for i in range(decode)]
        values: dict[str, object] = dict(
            prefill=["http://127.0.0.1:9"],
            decode=urls,
            model=str(model),
            disagg_threshold_tokens=64,
            busy_tokens=STEP,
            itl_objective_ms=OBJECTIVE_S * 1e3,
        )
        proxy_settings = ProxySettings(**{**values, **settings})
        prefill_pool = EnginePool("prefill", proxy_settings.prefill, 1, 30)
        decode_pool = EnginePool("decode", proxy_settings.decode, 1, 30)
        router = Router(proxy_settings, prefill_pool, decode_pool, tokenizer)

        async def scenario_then_close() -> T:
            try:
                return await scenario(router, prefill_pool, decode_pool)
            finally:
                await router.close()

        return asyncio.run(scenario_then_close())

    return run


async def routed_tokens(router: Router, tokens: int) -> tuple[str, str]:
    """(path, reason) of a completion whose prompt is `tokens` token ids."""
    body = {"model": "fake-model", "prompt": list(range(1000, 1000 + tokens)), "max_tokens": 1}
    route = await router.route("/v1/completions", body)
    return route.path, route.reason


def answer(router: Router, pool: EnginePool, tokens: int, seconds: float, index: int = 0) -> None:
    """What the forwarder tells the router: an engine of `pool` computed a `tokens`-token prompt
    and answered after `seconds`."""
    hop = Hop(pool.role, tokens, least_loaded, Prompt(tokens))
    router.answered(pool.endpoints[index], hop, seconds)


def test_a_streaming_decode_engine_gets_short_prompts_but_not_long_ones(router_for):
    async def scenario(router: Router, prefill: EnginePool, decode: EnginePool):
        answer(router, prefill, 500, 1.0)  # 2 ms a token
        prefill.endpoints[0].pending_tokens = STEP  # saturated
        decode.endpoints[0].in_flight = 1  # a stream
        return [await routed_tokens(router, n) for n in (30, 60, 300)]

    short, over, long = router_for(scenario)
    assert short == ("direct", "short_prompt")  # 60 ms
    assert over == ("disaggregated", "itl_objective")  # short, but 120 ms
    assert long == ("disaggregated", "itl_objective")  # 600 ms; before: direct, prefill_busy


def test_without_a_stream_or_with_the_objective_off_auto_routes_as_before(router_for):
    async def scenario(router: Router, prefill: EnginePool, decode: EnginePool):
        answer(router, prefill, 500, 1.0)
        prefill.endpoints[0].pending_tokens = STEP
        idle = [await routed_tokens(router, n) for n in (60, 300)]
        decode.endpoints[0].in_flight = 1
        return idle, await routed_tokens(router, 300)

    idle, off = router_for(scenario, itl_objective_ms=0)
    assert idle == [("direct", "short_prompt"), ("direct", "prefill_busy")]
    assert off == ("direct", "prefill_busy")
    idle, on = router_for(scenario)
    assert idle == [("direct", "short_prompt"), ("direct", "prefill_busy")]
    assert on == ("disaggregated", "itl_objective")


def test_the_estimate_learns_from_answers_the_engines_own_first(router_for):
    async def scenario(router: Router, prefill: EnginePool, decode: EnginePool):
        decode.endpoints[0].in_flight = 1
        seen = [await routed_tokens(router, 40)]  # nothing measured: streams are spared
        answer(router, prefill, 1000, 1.0)  # 1 ms a token on prefill
        seen.append(await routed_tokens(router, 40))  # 40 ms: taken
        for _ in range(2):  # the decode engine itself is slower: 5 ms a token
            answer(router, decode, 100, 0.5)
        seen.append(await routed_tokens(router, 40))  # 200 ms
        return seen

    assert router_for(scenario) == [
        ("disaggregated", "itl_objective"),
        ("direct", "short_prompt"),
        ("disaggregated", "itl_objective"),
    ]


def test_a_direct_prompt_goes_to_the_decode_engine_that_keeps_the_objective(router_for):
    async def scenario(router: Router, prefill: EnginePool, decode: EnginePool):
        busy, spare = decode.endpoints
        prefill.endpoints[0].pending_tokens = STEP
        answer(router, decode, 100, 1.0, index=0)  # 10 ms a token on the first
        answer(router, decode, 100, 0.01, index=1)  # 0.1 ms a token on the second
        busy.in_flight, spare.in_flight = 1, 2  # least loaded alone would pick the first
        route: Route = await router.route(
            "/v1/completions", {"model": "fake-model", "prompt": list(range(300)), "max_tokens": 1}
        )
        return route, min(decode.endpoints, key=route.generate.rank) is spare

    route, picked_spare = router_for(scenario, decode=2)
    assert (route.path, route.reason) == ("direct", "prefill_busy")
    assert picked_spare


def test_answers_that_loaded_or_reused_a_prefix_do_not_teach_the_cost(router_for):
    async def scenario(router: Router, prefill: EnginePool, decode: EnginePool):
        loaded = Prompt(500, stored=400)  # the decode engine loaded 400 tokens from the store
        router.answered(decode.endpoints[0], Hop("decode", 100, least_loaded, loaded), 0.001)
        reused = Prompt(512, keys=("k1", "k2"), chunk_size=256)
        router.memory.remember(prefill.endpoints[0].url, reused.keys)  # in its prefix cache
        router.answered(prefill.endpoints[0], Hop("prefill", 512, least_loaded, reused), 0.001)
        nothing = router.cost.per_token_s(decode.endpoints[0].url)
        computed = Prompt(512, keys=("k1", "k3"), chunk_size=256)  # the second half is new
        router.answered(prefill.endpoints[0], Hop("prefill", 512, least_loaded, computed), 0.256)
        return nothing, router.cost.per_token_s(prefill.endpoints[0].url)

    nothing, learned = router_for(scenario)
    assert nothing is None
    assert learned == pytest.approx(0.001)  # 256 tokens computed in 0.256 s


# -- whole proxies in front of fake engines -----------------------------------------------------


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Hang guard only: the conditions here come true within milliseconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@contextmanager
def stream_from(url: str) -> Iterator[None]:
    """A stream running at `url` (the proxy, or an engine) while the block runs: its first token
    is in before the block starts; it is closed after."""
    body = chat("Hi there!", stream=True) | {"max_tokens": 100_000}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        yield


def background(work: Callable[[], T]) -> tuple[threading.Thread, list[T]]:
    """Runs `work` in a thread; its result lands in the list."""
    results: list[T] = []
    thread = threading.Thread(target=lambda: results.append(work()), daemon=True)
    thread.start()
    return thread, results


def pending(url: str) -> float:
    return total(url, "splitwise_proxy_engine_pending_tokens", role="prefill")


def test_through_the_proxy_a_stream_keeps_long_prompts_off_its_engine(routed):
    engines, url = routed(busy_tokens=100, itl_objective_ms=200)
    (prefill, _), (decode, _) = engines["prefill"][0], engines["decode"][0]
    decode.behaviour.tokens, decode.behaviour.token_interval_s = 100_000, 0.01
    prefill.behaviour.delay_s = 0.5  # 187 tokens in 0.5 s: ~3 ms a token, learned
    assert route_of(send(url, chat(LONG)))["reason"] == "long_uncached"
    prefill.behaviour.delay_s = 0.0
    hold = prefill.behaviour.hold = threading.Event()
    try:
        with stream_from(url):
            saturating = background(lambda: route_of(send(url, chat(LONG))))
            wait_for(lambda: pending(url) >= 100)  # prefill is saturated
            long_prompt = background(lambda: route_of(send(url, chat(OTHER))))  # 176 tokens
            wait_for(lambda: len(prefill.record.requests) == 3)  # it went to prefill
            short = route_of(send(url, chat("Hi there!")))  # 33 tokens: ~0.1 s
    finally:
        hold.set()
    for thread, _ in (saturating, long_prompt):
        thread.join(30)
    assert (short["path"], short["reason"]) == ("direct", "short_prompt")
    assert [(r["path"], r["reason"]) for r in long_prompt[1]] == [
        ("disaggregated", "itl_objective")
    ]
    assert [r["reason"] for r in saturating[1]] == ["long_uncached"]


def test_a_stream_the_proxy_did_not_send_counts_too(routed):
    """The engine's own count (vLLM's gauges on /metrics) shows streams other clients run."""
    engines, url = routed(busy_tokens=100, itl_objective_ms=200)
    (prefill, _), (decode, decode_url) = engines["prefill"][0], engines["decode"][0]
    decode.behaviour.tokens, decode.behaviour.token_interval_s = 100_000, 0.01
    hold = prefill.behaviour.hold = threading.Event()
    try:
        saturating = background(lambda: route_of(send(url, chat(LONG))))
        wait_for(lambda: pending(url) >= 100)
        with stream_from(decode_url):  # straight to the engine: the proxy has none in flight
            spared = background(lambda: route_of(send(url, chat(OTHER))))
            wait_for(lambda: len(prefill.record.requests) == 2)  # it went to prefill
        wait_for(lambda: decode.record.running == 0)
        idle = route_of(send(url, chat(OTHER)))  # prefill still saturated, no stream
    finally:
        hold.set()
    for thread, _ in (saturating, spared):
        thread.join(30)
    assert [(r["path"], r["reason"]) for r in spared[1]] == [("disaggregated", "itl_objective")]
    assert (idle["path"], idle["reason"]) == ("direct", "prefill_busy")


def test_a_decode_engines_own_first_tokens_teach_its_cost(routed):
    engines, url = routed(disagg_threshold_tokens=1000, itl_objective_ms=200)
    decode = engines["decode"][0][0]
    decode.behaviour.delay_s = 0.05  # 187 tokens computed in 0.05 s: 0.3 ms a token
    assert route_of(send(url, chat(LONG, stream=True)))["path"] == "direct"
    decode.behaviour.delay_s = 0.0
    decode.behaviour.tokens, decode.behaviour.token_interval_s = 100_000, 0.01
    with stream_from(url):
        route = route_of(send(url, chat(OTHER)))  # 176 tokens: ~50 ms
    # Unmeasured, it would have gone through prefill (test_the_estimate_learns_...).
    assert (route["path"], route["reason"]) == ("direct", "short_prompt")
