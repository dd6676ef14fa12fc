"""One request through the whole system with tracing on (real vLLM CPU engines, 1P1D, `--disagg
always`), its spans received by an OTLP/HTTP receiver: one trace holding the proxy's spans, each
engine's own `llm_request` span, and the connector's save (prefill) and load (decode), each
under the right parent and inside it in time; the proxy's span lasts as long as the client
waited (within 10%), and its steps fill it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from splitwise_local.samples import SHORT_PROMPT
from splitwise_testing.launch import Running, launch_system, leftovers, sweep
from splitwise_testing.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
HEALTH_DEADLINE_S = 60.0
SPANS_WAIT_S = 60  # a hang guard: every exporter here sends within 0.2 s of a span's end


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def system(tmp_path_factory, receiver) -> Iterator[Running]:
    run_dir = tmp_path_factory.mktemp("tracing") / "run"
    traced = ["--otlp-traces-endpoint", f"http://127.0.0.1:{receiver.port}"]
    traced += ["--otlp-traces-protocol", "http/protobuf"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # every exporter of the run: 0.2 s, not 5
        running = launch_system(run_dir, HEALTH_DEADLINE_S, ["--disagg", "always", *traced])
    try:
        yield running
        running.launch.stop()
        assert leftovers(run_dir) == []
    finally:
        running.launch.stop()
        sweep(run_dir)


EXPECTED = {
    ("splitwise-proxy", "POST /v1/chat/completions"),
    ("splitwise-proxy", "proxy.route"),
    ("splitwise-proxy", "proxy.admission"),
    ("splitwise-proxy", "proxy.prefill"),
    ("splitwise-proxy", "proxy.decode"),
    ("prefill-engine", "llm_request"),
    ("prefill-engine", "splitwise.save"),
    ("decode-engine", "llm_request"),
    ("decode-engine", "splitwise.load"),
}


def inside(child: ReceivedSpan, parent: ReceivedSpan) -> bool:
    return parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns


def test_one_request_is_one_trace_across_proxy_engines_and_store(system, receiver):
    body = {
        "model": system.model,
        "messages": [{"role": "user", "content": SHORT_PROMPT}],
        "max_tokens": 16,
        "temperature": 0,
    }
    started = time.perf_counter()
    reply = httpx.post(f"{system.url}/v1/chat/completions", json=body, timeout=600)
    client_s = time.perf_counter() - started
    reply.raise_for_status()
    prompt_tokens = reply.json()["usage"]["prompt_tokens"]

    def complete(spans: list[ReceivedSpan]) -> bool:
        return {(span.service, span.name) for span in spans} >= EXPECTED

    # Besides the request's trace, the engines trace their own start (loading, KV cache).
    received = receiver.wait_for(complete, SPANS_WAIT_S)
    (root,) = [span for span in received if span.name == "POST /v1/chat/completions"]
    assert root.parent_id == ""
    spans = [span for span in received if span.trace_id == root.trace_id]
    named = {(span.service, span.name): span for span in spans}
    assert set(named) == EXPECTED, sorted(named)
    assert len(spans) == len(EXPECTED), "one span each, one request"

    prefill_hop = named["splitwise-proxy", "proxy.prefill"]
    decode_hop = named["splitwise-proxy", "proxy.decode"]
    parents = {
        ("splitwise-proxy", "proxy.route"): root,
        ("splitwise-proxy", "proxy.admission"): root,
        ("splitwise-proxy", "proxy.prefill"): root,
        ("splitwise-proxy", "proxy.decode"): root,
        ("prefill-engine", "llm_request"): prefill_hop,
        ("prefill-engine", "splitwise.save"): prefill_hop,
        ("decode-engine", "llm_request"): decode_hop,
        ("decode-engine", "splitwise.load"): decode_hop,
    }
    for key, parent in parents.items():
        span = named[key]
        assert span.parent_id == parent.span_id, key
        assert inside(span, parent), (key, span, parent)
        assert span.error is None, span
    # The store's part, from the connector on each side.
    save, load = named["prefill-engine", "splitwise.save"], named["decode-engine", "splitwise.load"]
    assert save.attributes["splitwise.tokens"] == prompt_tokens
    assert save.attributes["splitwise.bytes"] > 0 and save.attributes["splitwise.chunks"] >= 1
    assert load.attributes["splitwise.hit"] is True
    assert load.attributes["splitwise.tokens"] == prompt_tokens - 1
    assert load.attributes["splitwise.bytes"] == save.attributes["splitwise.bytes"]
    assert save.end_ns <= load.start_ns
    prefill_request = named["prefill-engine", "llm_request"]
    assert prefill_request.attributes["gen_ai.usage.prompt_tokens"] == prompt_tokens
    # The timings add up: the proxy's span is the client's wait, and its steps fill it.
    assert abs(root.seconds - client_s) <= 0.1 * client_s, (root.seconds, client_s)
    steps = sum(named["splitwise-proxy", f"proxy.{step}"].seconds
                for step in ("route", "admission", "prefill", "decode"))  # fmt: skip
    assert steps <= root.seconds and steps >= 0.9 * root.seconds, (steps, root.seconds)
