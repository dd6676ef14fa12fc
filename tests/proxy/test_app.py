"""The proxy's request walk against real fake-engine servers: happy paths and every failure."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from splitwise_testing.scrape import total, value
from tests.proxy.equivalence import assert_proxy_matches_decode

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "three word prompt"}]}
COMPLETION = {"model": "fake-model", "prompt": "a five word long prompt"}
HANG_GUARD_S = 60  # a deadline only a hang reaches: what it guards takes well under a second


def sse_events(text: str) -> list[dict | str]:
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def settle(base: str) -> None:
    """Waits until the proxy has finished accounting for every request (streams end late)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while total(base, "splitwise_proxy_in_flight_requests") and time.monotonic() < deadline:
        time.sleep(0.01)


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.fixture
def pair(fake, proxy):
    """A prefill fake, a decode fake and a proxy in front of them."""
    prefill, prefill_url = fake(name="prefill")
    decode, decode_url = fake(name="decode", tokens=4)
    return prefill, decode, proxy(prefill=[prefill_url], decode=[decode_url])


def test_whole_chat_prefills_one_token_then_returns_decode_answer(pair):
    prefill, decode, base = pair
    body = {**CHAT, "max_completion_tokens": 3, "min_tokens": 2, "temperature": 0}
    response = httpx.post(base + "/v1/chat/completions", json=body, headers={"x-request-id": "r1"})

    assert response.status_code == 200
    answer = response.json()
    assert answer["choices"][0]["message"]["content"] == " decode0 decode1 decode2"
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    [(path, sent, headers)] = prefill.record.requests
    assert path == "/v1/chat/completions"
    expected = {k: v for k, v in body.items() if k != "min_tokens"}
    assert sent == {**expected, "max_tokens": 1, "max_completion_tokens": 1, "stream": False}
    assert headers["x-request-id"] == "r1"
    [(_, decoded, _)] = decode.record.requests
    assert decoded == body


@pytest.mark.parametrize(
    ("route", "body"),
    [
        (
            "/v1/completions",
            {**COMPLETION, "echo": True, "logprobs": 2, "prompt_logprobs": 1, "n": 3,
             "best_of": 4, "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 2, "n": 2}),
    ],
)  # fmt: skip
def test_the_prefill_hop_drops_what_only_the_final_answer_needs(pair, route, body):
    prefill, decode, base = pair
    assert httpx.post(base + route, json=body).status_code == 200
    [(_, sent, _)] = prefill.record.requests
    kept = {k: v for k, v in body.items() if k in ("model", "prompt", "messages")}
    assert sent == {**kept, "max_tokens": 1, "stream": False}
    [(_, decoded, _)] = decode.record.requests
    assert decoded == body


def test_streamed_completion_passes_decode_events_through(pair):
    prefill, decode, base = pair
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base + "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())

    assert (
        "".join(e["choices"][0]["text"] for e in events[:4]) == " decode0 decode1 decode2 decode3"
    )
    assert events[4]["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    assert events[5] == "[DONE]"
    [(_, sent, _)] = prefill.record.requests
    assert sent["stream"] is False and "stream_options" not in sent and sent["max_tokens"] == 1
    assert decode.record.requests[0][1] == body
    assert decode.record.streams_completed == 1


def test_proxy_matches_decode_alone(fake, proxy):
    """The real-engine acceptance check, proven here on fakes."""
    prefill, prefill_url = fake(name="prefill")
    _, decode_url = fake(name="decode")
    assert_proxy_matches_decode(
        proxy(prefill=[prefill_url], decode=[decode_url]), decode_url, "fake-model"
    )
    assert len(prefill.record.requests) == 4


def test_engine_cookies_are_not_replayed_to_engines(fake, proxy):
    prefill, prefill_url = fake(name="prefill", set_cookie=True)
    decode, decode_url = fake(name="decode", set_cookie=True)
    # By host name: aiohttp's default jar would keep cookies from names, not from IPs.
    by_name = [url.replace("127.0.0.1", "localhost") for url in (prefill_url, decode_url)]
    base = proxy(prefill=by_name[:1], decode=by_name[1:])
    for _ in range(2):
        assert httpx.post(base + "/v1/completions", json=COMPLETION).status_code == 200
    for engine in (prefill, decode):
        assert "cookie" not in engine.record.requests[1][2]


def test_models_come_from_decode_pool(pair):
    _, _, base = pair
    [model] = httpx.get(base + "/v1/models").json()["data"]
    assert model["owned_by"] == "decode"


@pytest.mark.parametrize("kind", ["error", "timeout", "unreachable"])
def test_prefill_failure_falls_back_to_decode(fake, proxy, dead_url, kind):
    """The timing-out prefill never answers (it is held until the test ends): only the proxy's
    prefill timeout can get the request past it, so any answer shows the timeout fired."""
    never = threading.Event()
    if kind == "unreachable":
        prefill, prefill_url = None, dead_url()
    else:
        behaviour = {"fail_status": 500} if kind == "error" else {"hold": never}
        prefill, prefill_url = fake(name="prefill", **behaviour)
    _, decode_url = fake(name="decode", tokens=2)
    base = proxy(prefill=[prefill_url], decode=[decode_url], prefill_timeout_s=0.3)

    try:
        response = httpx.post(base + "/v1/chat/completions", json=CHAT, timeout=HANG_GUARD_S)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == " decode0 decode1"
        assert total(base, "splitwise_proxy_prefill_fallbacks_total") == 1
        assert total(base, "splitwise_proxy_errors_total", kind=f"prefill_{kind}") == 1
        if kind == "timeout":
            assert len(prefill.record.requests) == 1  # asked, and still unanswered
            closed = prefill.record.cut.wait(HANG_GUARD_S)
            assert closed, "the timed-out prefill request was not closed"
    finally:
        never.set()


def test_prefill_engine_marked_down_is_skipped_until_back_off_ends(fake, proxy, dead_url):
    _, decode_url = fake(name="decode")
    dead = dead_url()
    base = proxy(prefill=[dead], decode=[decode_url], backoff_initial_s=60)
    for _ in range(3):
        assert httpx.post(base + "/v1/completions", json=COMPLETION).status_code == 200
    assert total(base, "splitwise_proxy_engine_failures_total") == 1
    assert value(base, "splitwise_proxy_engine_up", engine=dead) == 0
    assert value(base, "splitwise_proxy_engine_up", engine=decode_url) == 1
    assert total(base, "splitwise_proxy_prefill_fallbacks_total") == 3


def test_no_fallback_passes_prefill_error_or_fails_in_openai_format(fake, proxy):
    _, prefill_url = fake(name="prefill", fail_status=500)
    decode, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[decode_url], fallback_to_decode=False)
    response = httpx.post(base + "/v1/completions", json=COMPLETION)
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "fake engine failure"

    timed_out = proxy(
        prefill=[fake(delay_s=5.0)[1]],
        decode=[decode_url],
        fallback_to_decode=False,
        prefill_timeout_s=0.2,
    )
    error = assert_openai_error(httpx.post(timed_out + "/v1/completions", json=COMPLETION), 504)
    assert error["code"] == "prefill_timeout"
    assert decode.record.requests == []


def test_no_decode_engine_reachable_is_503_without_prefill_fallback(fake, proxy, dead_url):
    _, prefill_url = fake(name="prefill")
    base = proxy(prefill=[prefill_url], decode=[dead_url(), dead_url()], fallback_to_prefill=False)
    response = httpx.post(base + "/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 503)
    assert error["type"] == "server_error"
    assert "no decode engine reachable" in error["message"]
    assert response.headers["retry-after"] == "10"
    # Both are now marked down: the next request is refused without trying them.
    error = assert_openai_error(httpx.post(base + "/v1/chat/completions", json=CHAT), 503)
    assert "marked down" in error["message"]


def test_decode_retries_another_engine_when_one_is_unreachable(fake, proxy, dead_url):
    _, prefill_url = fake(name="prefill")
    decode, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[dead_url(), decode_url])
    for _ in range(2):
        assert httpx.post(base + "/v1/completions", json=COMPLETION).status_code == 200
    assert len(decode.record.requests) == 2


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({**CHAT, "model": "no-such-model"}, 404),
        ({**CHAT, "messages": [{"role": "user", "content": "word " * 50}]}, 400),
    ],
)
def test_engine_client_errors_pass_through_unchanged(fake, proxy, body, status):
    _, prefill_url = fake(name="prefill", max_prompt_words=10)
    _, decode_url = fake(name="decode", max_prompt_words=10)
    base = proxy(prefill=[prefill_url], decode=[decode_url])
    direct = httpx.post(decode_url + "/v1/chat/completions", json=body)
    for stream in (False, True):
        response = httpx.post(base + "/v1/chat/completions", json={**body, "stream": stream})
        assert response.status_code == status
        assert response.content == direct.content
        assert response.headers["content-type"] == direct.headers["content-type"]


def test_stream_refused_before_its_first_token_is_a_4xx(fake, proxy):
    """vLLM refuses too many `logprobs` only once a stream has begun (200, then an error
    event); through the proxy the caller gets the engine's error with its 400 instead."""
    _, prefill_url = fake(name="prefill")
    _, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[decode_url])
    body = {**COMPLETION, "stream": True, "logprobs": 100}
    engine = httpx.post(decode_url + "/v1/completions", json=body)
    assert engine.status_code == 200 and "error" in sse_events(engine.text)[0]

    response = httpx.post(base + "/v1/completions", json=body)
    error = assert_openai_error(response, 400)
    assert error == sse_events(engine.text)[0]["error"]
    assert error["param"] == "logprobs"
    settle(base)
    assert value(base, "splitwise_proxy_engine_in_flight", engine=decode_url) == 0
    # A stream that starts with tokens is relayed as before.
    good = httpx.post(base + "/v1/completions", json={**body, "logprobs": 2})
    assert good.status_code == 200 and sse_events(good.text)[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b'{"model": "fake-model", "messages": [', 400, "invalid_json"),
        (b"\xff\xfe not utf-8", 400, "invalid_json"),
        (b"[1, 2, 3]", 400, "invalid_json"),
        (b'{"prompt": "' + b"x" * 2000 + b'"}', 413, "body_too_large"),
    ],
)
def test_bad_bodies_get_openai_errors(proxy, content, status, code):
    base = proxy(prefill=["http://127.0.0.1:9"], decode=["http://127.0.0.1:9"], max_body_bytes=1000)
    response = httpx.post(base + "/v1/completions", content=content)
    assert assert_openai_error(response, status)["code"] == code


def test_body_over_limit_without_content_length_is_413(proxy):
    base = proxy(prefill=["http://127.0.0.1:9"], decode=["http://127.0.0.1:9"], max_body_bytes=1000)

    def chunks():
        for _ in range(10):
            yield b"x" * 500

    response = httpx.post(base + "/v1/completions", content=chunks())
    assert assert_openai_error(response, 413)["code"] == "body_too_large"


def test_api_key_is_required_and_forwarded(fake, proxy):
    prefill, prefill_url = fake(name="prefill")
    decode, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[decode_url], api_key="s3cret")
    malformed = [
        {"authorization": "Bearer s3crét".encode()},  # UTF-8 bytes, read as latin-1
        {"authorization": b"Bearer \xff\xfe"},  # not text at all
        {"authorization": "Bearer s3cret\u00e9".encode("latin-1")},
        {"authorization": b"Bearer"},
        {"authorization": b"\xe9\xe9 s3cret"},
    ]
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}, *malformed):
        response = httpx.post(base + "/v1/completions", json=COMPLETION, headers=headers)
        assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
        assert httpx.get(base + "/v1/models", headers=headers).status_code == 401
    good = {"authorization": "Bearer s3cret"}
    assert httpx.post(base + "/v1/completions", json=COMPLETION, headers=good).status_code == 200
    assert httpx.get(base + "/v1/models", headers=good).status_code == 200
    assert prefill.record.requests[0][2]["authorization"] == "Bearer s3cret"
    assert decode.record.requests[0][2]["authorization"] == "Bearer s3cret"
    assert httpx.get(base + "/health").status_code == 200


def test_a_credential_that_is_not_ascii_is_refused_without_a_key_too(pair):
    prefill, decode, base = pair
    for raw in ("Bearer s3crét".encode(), b"Bearer \xff\xfe"):
        response = httpx.post(
            base + "/v1/completions", json=COMPLETION, headers={"authorization": raw}
        )
        assert assert_openai_error(response, 401)["message"] == "malformed Authorization header"
    assert prefill.record.requests == decode.record.requests == []
    plain = {"authorization": "Bearer anything"}  # an engine with a key judges this one
    assert httpx.post(base + "/v1/completions", json=COMPLETION, headers=plain).status_code == 200
    assert decode.record.requests[0][2]["authorization"] == "Bearer anything"


def test_health_says_which_engines_are_down(fake, proxy, dead_url):
    _, prefill_url = fake(name="prefill")
    _, decode_url = fake(name="decode")
    dead = dead_url()
    healthy = httpx.get(proxy(prefill=[prefill_url], decode=[decode_url]) + "/health")
    assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
    degraded = httpx.get(proxy(prefill=[prefill_url], decode=[decode_url, dead]) + "/health")
    assert degraded.status_code == 200
    # Engines by role and number: their addresses are the operator's business.
    assert degraded.json() == {
        "status": "degraded",
        "prefill": {"prefill 0": "up"},
        "decode": {"decode 0": "up", "decode 1": "down"},
        "down": ["decode 1"],
    }
    detailed = proxy(prefill=[prefill_url], decode=[decode_url, dead], route_detail=True)
    assert httpx.get(detailed + "/health").json() == {
        "status": "degraded",
        "prefill": {prefill_url: "up"},
        "decode": {decode_url: "up", dead: "down"},
        "down": [dead],
    }
    # No decode engine, but the prefill engine can serve whole requests.
    no_decode = httpx.get(proxy(prefill=[prefill_url], decode=[dead]) + "/health")
    assert no_decode.status_code == 200 and no_decode.json()["status"] == "degraded"
    sick = proxy(prefill=[prefill_url], decode=[dead], fallback_to_prefill=False)
    sick = httpx.get(sick + "/health")
    assert sick.status_code == 503
    assert sick.json()["status"] == "unavailable" and sick.json()["down"] == ["decode 0"]


@pytest.mark.parametrize("detail", [False, True])
def test_errors_name_engine_addresses_only_with_route_detail(fake, proxy, dead_url, detail):
    _, prefill_url = fake(name="prefill")
    dead = dead_url()
    base = proxy(
        prefill=[prefill_url], decode=[dead], fallback_to_prefill=False, route_detail=detail
    )
    response = httpx.post(base + "/v1/chat/completions", json=CHAT)
    error = assert_openai_error(response, 503)
    assert "no decode engine reachable" in error["message"]
    assert (dead in error["message"]) is detail
    assert ("127.0.0.1" in response.text) is detail


def test_requests_spread_round_robin_over_idle_engines(fake, proxy):
    engines = [fake(name=f"d{i}") for i in range(3)]
    _, prefill_url = fake(name="prefill")
    base = proxy(prefill=[prefill_url], decode=[url for _, url in engines])
    for _ in range(6):
        assert httpx.post(base + "/v1/completions", json=COMPLETION).status_code == 200
    assert [len(engine.record.requests) for engine, _ in engines] == [2, 2, 2]


def test_caller_disconnect_mid_stream_cancels_upstream(fake, proxy):
    """Decode sends one token, then nothing for an hour: only a cancel can end its stream."""
    _, prefill_url = fake(name="prefill")
    decode, decode_url = fake(name="decode", tokens=2, token_interval_s=3600)
    base = proxy(prefill=[prefill_url], decode=[decode_url])
    body = {**CHAT, "stream": True}
    with httpx.stream("POST", base + "/v1/chat/completions", json=body) as response:
        next(response.iter_bytes())
    closed = decode.record.cut.wait(HANG_GUARD_S)
    assert closed, "the decode stream kept running after the caller left"
    assert decode.record.streams_cut == 1 and decode.record.streams_completed == 0
    settle(base)
    assert value(base, "splitwise_proxy_in_flight_requests") == 0
    assert value(base, "splitwise_proxy_engine_in_flight", engine=decode_url) == 0
    assert total(base, "splitwise_proxy_errors_total", kind="client_disconnected") == 1


def test_caller_disconnect_during_prefill_cancels_it(fake, proxy):
    """The prefill is held until the test ends: only a cancel can end its request."""
    never = threading.Event()
    prefill, prefill_url = fake(name="prefill", hold=never)
    decode, decode_url = fake(name="decode")
    base = proxy(prefill=[prefill_url], decode=[decode_url])
    try:
        with pytest.raises(httpx.ReadTimeout):  # the caller gives up, and hangs up
            httpx.post(base + "/v1/completions", json=COMPLETION, timeout=0.3)
        closed = prefill.record.cut.wait(HANG_GUARD_S)
    finally:
        never.set()
    assert closed, "the prefill request kept running after the caller left"
    assert prefill.record.whole_cut == 1
    settle(base)
    assert decode.record.requests == []
    assert value(base, "splitwise_proxy_engine_in_flight", engine=prefill_url) == 0
    assert total(base, "splitwise_proxy_errors_total", kind="client_disconnected") == 1


def test_decode_stalling_mid_stream_ends_with_an_error_event(fake, proxy):
    """Decode sends one token, then nothing for an hour: only the proxy's timeout ends it."""
    _, prefill_url = fake(name="prefill")
    decode, decode_url = fake(name="decode", tokens=5, token_interval_s=3600)
    base = proxy(prefill=[prefill_url], decode=[decode_url], decode_timeout_s=0.3)
    body = {**COMPLETION, "stream": True}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=HANG_GUARD_S) as r:
        events = sse_events(r.read().decode())
    assert events[0]["choices"][0]["text"] == " decode0"
    assert events[1]["error"]["type"] == "server_error"
    assert "Timeout" in events[1]["error"]["message"]
    assert events[2] == "[DONE]"
    assert total(base, "splitwise_proxy_errors_total", kind="decode_timeout_mid_stream") == 1
    assert decode.record.cut.wait(HANG_GUARD_S)


def test_unknown_route_and_method_are_openai_errors(pair):
    _, _, base = pair
    assert_openai_error(httpx.get(base + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(base + "/v1/completions"), 405)


def test_metrics_expose_latencies_per_engine(fake, proxy):
    _, prefill_url = fake(name="prefill")
    _, decode_url = fake(name="decode", tokens=4)
    base = proxy(prefill=[prefill_url], decode=[decode_url])
    httpx.post(base + "/v1/completions", json=COMPLETION)
    with httpx.stream("POST", base + "/v1/completions", json={**COMPLETION, "stream": True}) as r:
        r.read()
    settle(base)
    route = "/v1/completions"
    assert value(base, "splitwise_proxy_requests_total", route=route, status="200") == 2
    assert value(base, "splitwise_proxy_request_seconds_count", route=route) == 2
    assert value(base, "splitwise_proxy_in_flight_requests") == 0
    assert value(base, "splitwise_proxy_prefill_seconds_count", engine=prefill_url) == 2
    assert value(base, "splitwise_proxy_decode_ttft_seconds_count", engine=decode_url) == 2
    for engine in (prefill_url, decode_url):
        assert value(base, "splitwise_proxy_engine_requests_total", engine=engine) == 2
