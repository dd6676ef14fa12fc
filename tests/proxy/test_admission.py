"""Admission control: the bound on each role's queued prompt tokens, the 429 past it, priority
for stored prefixes, and that every way a request ends frees what it held.

The rule and the measured bound are checked on their own with a fake clock; the rest through a
real proxy in front of fake engines that hold their answers until the test releases them
(`FakeBehaviour.hold`), so what is queued at each moment is known exactly.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from splitwise_local.proxy.admission import BYTES_PER_TOKEN, Admission, Refusal, Ticket
from splitwise_local.proxy.pool import EnginePool, least_loaded
from splitwise_local.proxy.routing import Hop, Prompt, Route
from splitwise_local.proxy.settings import DEFAULT_BUSY_TOKENS, ProxySettings
from splitwise_testing.scrape import value
from tests.proxy.routes import LONG, OTHER, chat, route_of, send, store_prompt
from tests.proxy.test_app import COMPLETION, assert_openai_error, settle

JSON = {"content-type": "application/json"}
BODY = json.dumps(COMPLETION).encode()
COST = len(BODY) // BYTES_PER_TOKEN  # what a request the proxy did not tokenize counts


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, **settings: object) -> Admission:
    values: dict = {"prefill": ["http://p:1", "http://p:2"], "decode": ["http://d:1"]}
    proxy_settings = ProxySettings(**{**values, "admission": True, **settings})
    pools = [EnginePool(role, values[role], 1.0, 5.0) for role in ("prefill", "decode")]
    return Admission(proxy_settings, pools, clock)


def through_prefill(tokens: int) -> Route:
    prompt = Prompt(tokens)
    decode = Hop("decode", 0, least_loaded)
    prefill = Hop("prefill", tokens, least_loaded)
    return Route("auto", "disaggregated", "long_uncached", prompt, decode, prefill)


def straight_to_decode(tokens: int, stored: int = 0) -> Route:
    prompt = Prompt(tokens + stored, stored=stored)
    return Route("auto", "direct", "short_prompt", prompt, Hop("decode", tokens, least_loaded))


def held(ticket: Ticket | Refusal) -> Ticket:
    assert isinstance(ticket, Ticket), ticket
    return ticket


# -- the rule, the share and the measured bound, on their own --------------------------------


def test_a_role_queues_up_to_its_bound_and_an_idle_role_takes_any_prompt():
    gate = admission(Clock(), admission_tokens=1000)
    held(gate.admit(through_prefill(5000), 0))  # larger than the bound, but nothing queued
    assert isinstance(gate.admit(through_prefill(1), 0), Refusal)
    fresh = admission(Clock(), admission_tokens=1000)
    held(fresh.admit(through_prefill(500), 0))
    held(fresh.admit(through_prefill(400), 0))  # 900: the bound less the stored share
    refusal = fresh.admit(through_prefill(1), 0)
    assert refusal == Refusal("prefill", 1)  # unmeasured: retry in a second
    held(fresh.admit(straight_to_decode(900), 0))  # the other role has its own queue
    assert fresh.queues["prefill"].refused == 1 and fresh.queues["decode"].refused == 0


def test_the_last_share_of_the_bound_is_for_requests_with_a_stored_prefix():
    gate = admission(Clock(), admission_tokens=1000)
    held(gate.admit(straight_to_decode(850), 0))
    assert isinstance(gate.admit(straight_to_decode(100), 0), Refusal)
    held(gate.admit(straight_to_decode(100, stored=3000), 0))  # counted for 100 tokens only
    assert gate.queues["decode"].queued == 950
    held(gate.admit(straight_to_decode(0, stored=3000), 0))  # all stored: costs nothing
    assert isinstance(gate.admit(straight_to_decode(60, stored=3000), 0), Refusal)


def test_an_untokenized_prompt_counts_its_body_size():
    gate = admission(Clock(), admission_tokens=1000)
    route = Route("always", "disaggregated", "always", Prompt(None),
                  Hop("decode", 0, least_loaded), Hop("prefill", 0, least_loaded))  # fmt: skip
    held(gate.admit(route, 2000))
    assert gate.queues["prefill"].queued == 2000 // BYTES_PER_TOKEN


def test_the_measured_bound_is_what_the_role_clears_within_the_ttft_target():
    clock = Clock()
    gate = admission(clock, admission_ttft_s=1.5)
    prefill = gate.queues["prefill"]
    assert prefill.bound == 2 * DEFAULT_BUSY_TOKENS  # unmeasured: one full batch per engine
    failed = held(gate.admit(through_prefill(300), 0))
    clock.now += 0.25
    failed.answered("prefill", ok=False)  # busy time, nothing cleared
    answered = held(gate.admit(through_prefill(600), 0))
    clock.now += 0.75
    answered.answered("prefill", ok=True)  # one busy second: 600 tokens cleared
    assert prefill.rate.per_s == pytest.approx(600)
    assert prefill.bound == 900
    clock.now += 30  # idle time does not count
    held(gate.admit(through_prefill(2000), 0))
    refusal = gate.admit(through_prefill(100), 0)
    # (2000 + 100 - 810) tokens over the rest of the bound at 600/s: 2.15 s, rounded up
    assert refusal == Refusal("prefill", 3)


def test_a_ticket_releases_its_tokens_once():
    gate = admission(Clock(), admission_tokens=1000)
    ticket = held(gate.admit(through_prefill(700), 0))
    ticket.answered("decode", ok=True)  # not the role it holds
    assert gate.queues["prefill"].queued == 700
    ticket.answered("prefill", ok=True)
    ticket.answered("prefill", ok=True)
    ticket.close()
    assert gate.queues["prefill"].queued == 0
    held(gate.admit(through_prefill(700), 0)).close()
    assert gate.queues["prefill"].queued == 0


# -- through a proxy -----------------------------------------------------------------------


def queued(base: str, role: str) -> float | None:
    return value(base, "splitwise_proxy_admission_queued_tokens", role=role)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout  # a hang guard only
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def post(base: str, body: bytes = BODY, timeout: float = 30) -> httpx.Response:
    return httpx.post(base + "/v1/completions", content=body, headers=JSON, timeout=timeout)


def test_past_the_bound_a_request_is_refused_at_once_with_retry_after(fake, proxy):
    gate = threading.Event()
    prefill, prefill_url = fake(name="prefill", hold=gate)
    decode, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[decode_url], admission=True, admission_tokens=COST)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, base)
        wait_for(lambda: len(prefill.record.requests) == 1)
        assert queued(base, "prefill") == COST

        refused = post(base)
        error = assert_openai_error(refused, 429)
        assert (error["type"], error["code"]) == ("tokens", "rate_limit_exceeded")
        assert "prefill" in error["message"]
        assert int(refused.headers["retry-after"]) >= 1
        assert len(prefill.record.requests) == 1 and decode.record.requests == []
        gate.set()
        assert first.result().status_code == 200
    settle(base)
    assert queued(base, "prefill") == 0
    assert post(base).status_code == 200  # room again
    assert value(base, "splitwise_proxy_admission_refused_total", role="prefill") == 1
    assert value(base, "splitwise_proxy_requests_total", route="/v1/completions", status="429") == 1
    assert value(base, "splitwise_proxy_admission_bound_tokens", role="prefill") == COST


def test_admission_off_measures_but_refuses_nothing(fake, proxy):
    gate = threading.Event()
    prefill, prefill_url = fake(name="prefill", hold=gate)
    _, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[decode_url], admission_tokens=COST)
    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(post, base) for _ in range(3)]
        wait_for(lambda: len(prefill.record.requests) == 3)
        assert queued(base, "prefill") == 3 * COST
        gate.set()
        assert [answer.result().status_code for answer in answers] == [200] * 3


def test_many_requests_at_once_never_over_admit(fake, proxy):
    gate = threading.Event()
    prefill, prefill_url = fake(name="prefill", hold=gate)
    _, decode_url = fake(name="decode")
    bound = -(-(5 * COST + COST // 2) * 10 // 9)  # its first 90% fit five requests, not six
    assert 5 * COST <= bound * 9 // 10 < 6 * COST
    base = proxy(prefill=[prefill_url], decode=[decode_url], admission=True, admission_tokens=bound)
    with ThreadPoolExecutor(40) as pool:
        answers = [pool.submit(post, base) for _ in range(40)]
        # Each request is either answered (refused) or held at the prefill engine.
        wait_for(lambda: sum(a.done() for a in answers) + len(prefill.record.requests) == 40)
        assert len(prefill.record.requests) == 5
        assert queued(base, "prefill") == 5 * COST
        gate.set()
        statuses = sorted(answer.result().status_code for answer in answers)
    assert statuses == [200] * 5 + [429] * 35
    settle(base)
    assert queued(base, "prefill") == 0


def test_a_stream_frees_its_tokens_at_its_first_token(fake, proxy):
    gate = threading.Event()
    decode, decode_url = fake(name="decode", tokens=200, token_interval_s=0.05, hold=gate)
    base = proxy(decode=[decode_url], disagg="never", admission=True, admission_tokens=COST)
    stream = json.dumps({**COMPLETION, "stream": True}).encode()
    first_token, leave = threading.Event(), threading.Event()

    def caller() -> None:
        url = base + "/v1/completions"
        with httpx.stream("POST", url, content=stream, headers=JSON, timeout=30) as reply:
            chunks = reply.iter_bytes()  # held: a dropped iterator closes the stream
            next(chunks)
            first_token.set()
            leave.wait(10)

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(caller)
        wait_for(lambda: len(decode.record.requests) == 1)
        assert queued(base, "decode") == len(stream) // BYTES_PER_TOKEN
        gate.set()
        assert first_token.wait(10)
        assert queued(base, "decode") == 0
        assert decode.record.streams_completed == decode.record.streams_cut == 0  # streaming
        leave.set()
        done.result()
    assert decode.record.cut.wait(3)
    settle(base)
    assert queued(base, "decode") == 0


def test_prefill_frees_its_tokens_when_it_answers_not_when_decode_does(fake, proxy):
    gate = threading.Event()
    prefill, prefill_url = fake(name="prefill")
    decode, decode_url = fake(name="decode", hold=gate)
    base = proxy(prefill=[prefill_url], decode=[decode_url], admission=True, admission_tokens=COST)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, base)
        wait_for(lambda: len(decode.record.requests) == 1)
        assert queued(base, "prefill") == 0  # prefilled; the request waits on decode
        second = pool.submit(post, base)  # so the next one fits
        wait_for(lambda: len(decode.record.requests) == 2)
        gate.set()
        assert first.result().status_code == second.result().status_code == 200
    assert len(prefill.record.requests) == 2


@pytest.mark.parametrize(
    "case",
    ["prefill answers 500", "prefill unreachable", "decode unreachable", "decode answers 500"],
)
def test_failed_requests_free_their_tokens(fake, proxy, dead_url, case):
    """Each request fills the bound alone: had one leaked, the next would be refused."""
    prefill_url = dead_url() if case == "prefill unreachable" else fake(name="prefill")[1]
    decode_url = dead_url() if case == "decode unreachable" else fake(name="decode")[1]
    if case == "prefill answers 500":
        prefill_url = fake(name="prefill", fail_status=500)[1]
    if case == "decode answers 500":
        decode_url = fake(name="decode", fail_status=500)[1]
    base = proxy(
        prefill=[prefill_url], decode=[decode_url], fallback_to_decode=False,
        fallback_to_prefill=False, backoff_initial_s=0.01, admission=True,
        admission_tokens=COST,
    )  # fmt: skip
    for _ in range(3):
        assert post(base).status_code in (500, 503)
    settle(base)
    assert queued(base, "prefill") == queued(base, "decode") == 0
    assert value(base, "splitwise_proxy_admission_refused_total", role="prefill") == 0


def test_a_caller_who_leaves_frees_its_tokens(fake, proxy):
    gate = threading.Event()
    prefill, prefill_url = fake(name="prefill", hold=gate)
    _, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[decode_url], admission=True, admission_tokens=COST)
    with pytest.raises(httpx.ReadTimeout):
        post(base, timeout=0.5)
    assert prefill.record.cut.wait(5), "the held prefill request was not cancelled"
    wait_for(lambda: queued(base, "prefill") == 0)
    gate.set()
    assert post(base).status_code == 200


def test_stored_prefix_requests_are_admitted_while_others_are_refused(
    routed, tokenizer, model, kv_config
):
    """Prefill is full with a long new prompt: another one is refused, while a stored prompt
    (straight to decode, counted for its uncached tokens only) is answered."""
    store_prompt(tokenizer, model, kv_config[0], LONG)
    engines, url = routed(admission=True, admission_tokens=200)
    gate = threading.Event()
    prefill = engines["prefill"][0][0]
    prefill.behaviour.hold = gate
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(send, url, chat(OTHER))
        wait_for(lambda: len(prefill.record.requests) == 1)
        refused = httpx.post(url + "/v1/chat/completions", json=chat(OTHER + " Why?"), timeout=30)
        assert_openai_error(refused, 429)
        route = route_of(send(url, chat(LONG)))
        assert (route["path"], route["reason"]) == ("direct", "stored_prefix")
        gate.set()
        assert route_of(first.result())["reason"] == "long_uncached"
    assert len(prefill.record.requests) == 1
    assert value(url, "splitwise_proxy_admission_refused_total", role="prefill") == 1
