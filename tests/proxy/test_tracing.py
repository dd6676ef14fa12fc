"""The proxy's traces, received by a real OTLP/HTTP receiver: one trace per request, a span per
step, and the `traceparent` each engine request carries (fake engines record it)."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from splitwise_local.proxy.settings import ProxySettings
from splitwise_testing.otlp_receiver import OtlpReceiver, ReceivedSpan

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "How far is the Moon?"}]}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
WAIT_S = 30  # a hang guard: the spans come within one export delay (50 ms here)


@pytest.fixture
def receiver(monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # export every 50 ms, not every 5 s
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def traced(fake, proxy, receiver):
    """`prefill, decode, url = traced(**settings)`: fakes (engine, url) and a proxy tracing to
    `receiver`."""

    def start(prefill=None, decode=None, **settings):
        prefill = prefill or fake(name="prefill")
        decode = decode or fake(name="decode", tokens=4)
        values = dict(
            prefill=[prefill[1]],
            decode=[decode[1]],
            disagg="always",
            otlp_traces_endpoint=f"http://127.0.0.1:{receiver.port}",
            otlp_traces_protocol="http/protobuf",
        )
        return prefill, decode, proxy(**{**values, **settings})

    return start


def root_of(spans: list[ReceivedSpan]) -> ReceivedSpan | None:
    return next((s for s in spans if s.service == "splitwise-proxy" and s.name.startswith("POST")),
                None)  # fmt: skip


def by_name(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def inside(child: ReceivedSpan, parent: ReceivedSpan) -> bool:
    return parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns


def test_the_endpoint_is_checked_and_gets_the_otlp_path_for_http():
    settings = ProxySettings(
        decode=["http://127.0.0.1:1"], disagg="never",
        otlp_traces_endpoint="http://127.0.0.1:4318", otlp_traces_protocol="http/protobuf",
    )  # fmt: skip
    assert settings.otlp_traces_endpoint == "http://127.0.0.1:4318/v1/traces"
    grpc = ProxySettings(decode=["http://127.0.0.1:1"], disagg="never",
                         otlp_traces_endpoint="http://127.0.0.1:4317")  # fmt: skip
    assert grpc.otlp_traces_endpoint == "http://127.0.0.1:4317"
    with pytest.raises(ValueError, match="host:port"):
        ProxySettings(decode=["http://127.0.0.1:1"], disagg="never", otlp_traces_endpoint="4317")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_one_request_is_one_trace_with_a_span_per_step(traced, receiver, stream):
    prefill, decode, url = traced()
    body = {**CHAT, "stream": stream}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
    assert reply.status_code == 200
    spans = receiver.wait_for(lambda spans: root_of(spans) is not None, WAIT_S)
    root = root_of(spans)
    assert root is not None
    assert root.name == "POST /v1/chat/completions" and root.parent_id == ""
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["splitwise.route.path"] == "disaggregated"
    assert {span.trace_id for span in spans} == {root.trace_id}
    steps = by_name([span for span in spans if span is not root])
    assert set(steps) == {"proxy.route", "proxy.admission", "proxy.prefill", "proxy.decode"}
    for step in steps.values():
        assert step.parent_id == root.span_id and inside(step, root), step
        assert step.error is None, step
    # In the order the request takes them.
    order = ["proxy.route", "proxy.admission", "proxy.prefill", "proxy.decode"]
    starts = [steps[name].start_ns for name in order]
    assert starts == sorted(starts)
    assert steps["proxy.prefill"].end_ns <= steps["proxy.decode"].start_ns
    # Each engine request carries its own hop span as the parent of the engine's spans.
    for (engine, engine_url), name in ((prefill, "proxy.prefill"), (decode, "proxy.decode")):
        hop = steps[name]
        _, _, headers = engine.record.requests[0]
        assert headers["traceparent"].startswith(f"00-{root.trace_id}-{hop.span_id}-")
        assert hop.attributes["splitwise.engine"] == engine_url
        assert hop.attributes["http.response.status_code"] == 200
    if stream:  # the decode span lasts until the engine's last chunk has been relayed
        events = [line for line in reply.text.splitlines() if line.startswith("data: {")]
        last_sent_ns = json.loads(events[-1][6:])["sent_at"] * 1e9
        assert hop.end_ns >= last_sent_ns


def test_the_callers_trace_is_the_parent(traced, receiver):
    _, (decode, _), url = traced()
    headers = {"traceparent": traceparent(CALLER_TRACE, CALLER_SPAN)}
    reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert reply.status_code == 200
    spans = receiver.wait_for(lambda spans: root_of(spans) is not None, WAIT_S)
    root = root_of(spans)
    assert root is not None
    assert (root.trace_id, root.parent_id) == (CALLER_TRACE, CALLER_SPAN)
    assert decode.record.requests[0][2]["traceparent"].startswith(f"00-{CALLER_TRACE}-")


def test_a_failed_prefill_is_an_error_span_and_decode_serves(traced, receiver, fake):
    _, (decode, _), url = traced(prefill=fake(name="prefill", fail_status=500))
    reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
    assert reply.status_code == 200
    spans = receiver.wait_for(lambda spans: root_of(spans) is not None, WAIT_S)
    steps = by_name([span for span in spans if span is not root_of(spans)])
    assert steps["proxy.prefill"].error == "prefill engine answered 500"
    assert steps["proxy.prefill"].attributes["http.response.status_code"] == 500
    assert steps["proxy.decode"].error is None
    # The route decided, and the route taken after the fallback.
    assert steps["proxy.route"].attributes["splitwise.route.reason"] == "always"
    root = root_of(spans)
    assert root is not None and root.attributes["splitwise.route.reason"] == "prefill_failed"
    assert len(decode.record.requests) == 1


def test_a_refusal_is_an_error_admission_span(traced, receiver, fake):
    """With one request held in prefill, the next finds prefill's queue full: 429."""
    hold = threading.Event()
    (prefill, _), _, url = traced(
        prefill=fake(name="prefill", hold=hold), admission=True, admission_tokens=1
    )
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=CHAT, timeout=30)
        while not prefill.record.requests:  # the first is admitted and held in prefill
            assert not first.done(), first.result()
            threading.Event().wait(0.01)
        refused = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)
        hold.set()
        assert first.result().status_code == 200
    assert refused.status_code == 429

    def refused_root(spans):
        return next((s for s in spans if s.attributes.get("http.response.status_code") == 429
                     and s.parent_id == ""), None)  # fmt: skip

    spans = receiver.wait_for(lambda spans: refused_root(spans) is not None, WAIT_S)
    root = refused_root(spans)
    steps = by_name([s for s in spans if s.trace_id == root.trace_id and s is not root])
    assert set(steps) == {"proxy.route", "proxy.admission"}
    admission = steps["proxy.admission"]
    assert admission.error == "refused"
    assert admission.attributes["splitwise.role"] == "prefill"
    assert admission.attributes["splitwise.queued_tokens"] > 0


def test_nothing_is_traced_when_off(fake, proxy, receiver):
    prefill, decode = fake(name="prefill"), fake(name="decode")
    url = proxy(prefill=[prefill[1]], decode=[decode[1]], disagg="always")
    headers = {"traceparent": traceparent(CALLER_TRACE, CALLER_SPAN)}
    reply = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert reply.status_code == 200
    for engine, _ in (prefill, decode):
        assert "traceparent" not in engine.record.requests[0][2]
