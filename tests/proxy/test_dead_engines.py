"""Routing around dead engines: what the proxy does when told of a death, or finds one itself.

The engines are fake servers (this is the proxy's logic; the chaos suite kills real engines).
`engine_state` is what the launcher calls from its supervisor's threads.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.settings import ProxySettings
from splitwise_testing.scrape import total, value
from tests.proxy.test_app import (
    CHAT,
    COMPLETION,
    HANG_GUARD_S,
    assert_openai_error,
    settle,
    sse_events,
)


@pytest.fixture
def system(fake, servers):
    """A prefill fake, a decode fake, and the proxy object in front of them."""
    prefill, prefill_url = fake(name="prefill", tokens=3)
    decode, decode_url = fake(name="decode", tokens=40)
    app = build_app(ProxySettings(prefill=[prefill_url], decode=[decode_url]))
    base = servers.serve(app)
    return prefill, decode, app.state.proxy, base


def engine_up(base: str, url: str) -> float | None:
    """The proxy's `splitwise_proxy_engine_up` for the engine at `url`."""
    return value(base, "splitwise_proxy_engine_up", engine=url)


def wait_for(condition) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_no_decode_engine_reachable_means_prefill_serves_the_whole_request(fake, proxy, dead_url):
    prefill, prefill_url = fake(name="prefill", tokens=3)
    base = proxy(prefill=[prefill_url], decode=[dead_url()])
    for stream in (False, True):
        body = {**CHAT, "max_tokens": 3, "stream": stream}
        response = httpx.post(base + "/v1/chat/completions", json=body)
        assert response.status_code == 200
        if stream:
            events = sse_events(response.text)
            assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == [
                " prefill0",
                " prefill1",
                " prefill2",
            ]
            assert events[-1] == "[DONE]"
        else:
            content = response.json()["choices"][0]["message"]["content"]
            assert content == " prefill0 prefill1 prefill2"
    # The first request found decode unreachable after prefilling; the second knew it was down
    # and sent the caller's request to prefill only, unchanged (not a one-token prefill copy).
    assert [body["max_tokens"] for _, body, _ in prefill.record.requests] == [1, 3, 3]
    assert prefill.record.requests[-1][1]["stream"] is True
    assert total(base, "splitwise_proxy_decode_fallbacks_total") == 2


def test_an_engine_answering_5xx_is_avoided_by_the_next_requests(fake, proxy):
    """vLLM answers 500 to every request for seconds after its engine core died."""
    _, prefill_url = fake(name="prefill", tokens=2)
    decode, decode_url = fake(name="decode", fail_status=500)
    base = proxy(prefill=[prefill_url], decode=[decode_url], backoff_initial_s=60)
    first = httpx.post(base + "/v1/completions", json=COMPLETION)
    assert first.status_code == 500  # the engine's own error, passed through
    assert first.json()["error"]["message"] == "fake engine failure"
    second = httpx.post(base + "/v1/completions", json=COMPLETION)
    assert second.json()["choices"][0]["text"] == " prefill0 prefill1"
    assert len(decode.record.requests) == 1
    assert engine_up(base, decode_url) == 0


def test_nothing_to_send_to_is_503_with_retry_after(proxy, dead_url):
    base = proxy(prefill=[dead_url()], decode=[dead_url()], retry_after_s=7)
    for _ in range(2):  # the first finds both unreachable, the second knows
        response = httpx.post(base + "/v1/completions", json=COMPLETION)
        assert assert_openai_error(response, 503)["type"] == "server_error"
        assert response.headers["retry-after"] == "7"
    assert httpx.get(base + "/v1/models").headers["retry-after"] == "7"


def test_told_of_a_decode_death_streams_end_with_an_error_and_prefill_takes_over(system):
    """Decode sends each stream one token, then nothing for an hour: only the supervisor's word
    can end the streams, so their ending at all shows they end on it."""
    prefill, decode, proxy, base = system
    decode_url = proxy.decode.endpoints[0].url
    decode.behaviour.token_interval_s = 3600
    streams: list[list[str]] = [[] for _ in range(3)]

    def stream(received: list[str]) -> None:
        body = {**COMPLETION, "stream": True}
        with httpx.stream(
            "POST", base + "/v1/completions", json=body, timeout=HANG_GUARD_S
        ) as response:
            received.extend(response.iter_text())

    callers = [threading.Thread(target=stream, args=(received,)) for received in streams]
    for caller in callers:
        caller.start()
    wait_for(lambda: all(" decode0" in "".join(received) for received in streams))
    proxy.engine_state(decode_url, up=False, cause="was killed by signal 9")
    for caller in callers:
        caller.join(HANG_GUARD_S)
    assert not any(caller.is_alive() for caller in callers), "a stream outlived its engine"
    for received in streams:
        events = sse_events("".join(received))
        assert events[0]["choices"][0]["text"] == " decode0"
        assert len(events) == 3  # the one token, the error, [DONE]
        error = events[1]["error"]
        assert error["type"] == "server_error" and error["code"] == "decode_died"
        assert "decode engine died: was killed by signal 9" in error["message"]
        assert decode_url not in error["message"]  # addresses only with route_detail
        assert events[2] == "[DONE]"
    assert decode.record.cut.wait(HANG_GUARD_S), "the engine's streams were not closed"
    assert engine_up(base, decode_url) == 0
    decode.behaviour.token_interval_s = 0

    # New requests go to the prefill engine, whole, without trying the dead decode engine.
    seen = len(decode.record.requests)
    response = httpx.post(base + "/v1/completions", json={**COMPLETION, "max_tokens": 2})
    assert response.json()["choices"][0]["text"] == " prefill0 prefill1"
    assert len(decode.record.requests) == seen
    assert prefill.record.requests[-1][1]["max_tokens"] == 2

    proxy.engine_state(decode_url, up=True)
    wait_for(lambda: engine_up(base, decode_url) == 1)
    response = httpx.post(base + "/v1/completions", json={**COMPLETION, "max_tokens": 2})
    assert response.json()["choices"][0]["text"] == " decode0 decode1"
    assert httpx.get(base + "/health").json()["status"] == "ok"
    settle(base)
    assert total(base, "splitwise_proxy_errors_total", kind="decode_died_mid_stream") == 3


def test_told_of_a_prefill_death_decode_computes_the_prompt(system):
    prefill, _, proxy, base = system
    prefill_url = proxy.prefill.endpoints[0].url
    proxy.engine_state(prefill_url, up=False, cause="has not answered its health check")
    wait_for(lambda: engine_up(base, prefill_url) == 0)
    health = httpx.get(base + "/health")
    assert health.status_code == 200 and health.json()["status"] == "degraded"
    assert health.json()["down"] == ["prefill 0"]
    response = httpx.post(base + "/v1/completions", json={**COMPLETION, "max_tokens": 1})
    assert response.json()["choices"][0]["text"] == " decode0"
    assert prefill.record.requests == []  # not even tried
    assert total(base, "splitwise_proxy_prefill_fallbacks_total") == 1


def test_a_health_check_does_not_overrule_the_supervisor(system):
    """The supervisor may know an engine that answers /health is being restarted."""
    _, _, proxy, base = system
    prefill_url = proxy.prefill.endpoints[0].url
    proxy.engine_state(prefill_url, up=False, cause="frozen")
    wait_for(lambda: engine_up(base, prefill_url) == 0)
    assert httpx.get(base + "/health").json()["prefill"] == {"prefill 0": "down"}
    assert engine_up(base, prefill_url) == 0
