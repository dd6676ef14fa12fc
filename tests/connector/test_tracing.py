"""The connector's spans: a request's traceparent from vLLM's `Request` through the scheduler's
plans to the worker's saves and loads, exported over OTLP/HTTP to a real receiver, each span a
child of that traceparent and carrying what was moved, or why not."""

from __future__ import annotations

import pickle
import time

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.request import Request

from splitwise_local.connector.codec import ChunkCodec
from splitwise_local.connector.connector import SplitwiseMetadata
from splitwise_local.connector.health import StoreGuard
from splitwise_local.connector.keys import NO_EXTRAS, KeyIdentity
from splitwise_local.connector.layout import LayerCaches, PagedLayout
from splitwise_local.connector.loader import KVLoader
from splitwise_local.connector.metrics import Counters
from splitwise_local.connector.planner import LoadPlan, SavePlan, prompt_chunks
from splitwise_local.connector.saver import KVSaver
from splitwise_local.connector.tracing import ConnectorTracer, request_traceparent
from splitwise_local.store.backend import open_backend
from splitwise_local.store.server import ServerSettings, StoreServer
from splitwise_testing.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.connector.test_planner import PROMPT, all_keys, planner
from tests.store.helpers import unique_name

pytestmark = pytest.mark.timeout(120)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
LAYOUT = PagedLayout(heads=2, head_size=8, block_size=16, kv_cache_layout="LBHNC")
TOKENS = 100  # chunks of 32: 0-32, 32-64, 64-96, 96-100
BLOCKS = list(range(7))
CHUNK_BYTES = 32 * 3 * 2 * 2 * 8 * 4  # 32 tokens x 3 layers x K,V x 2 heads x 8 x float32


@pytest.fixture
def receiver():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def tracer(receiver):
    """A tracer set up as in an engine that traces: from the variables vLLM sets."""
    environ = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "decode-engine",
    }
    tracer = ConnectorTracer.from_environment(environ)
    assert tracer is not None
    yield tracer
    tracer.close()


def exported(tracer: ConnectorTracer, receiver: OtlpReceiver) -> list[ReceivedSpan]:
    """Every span the tracer made, once it has exported them all (its close flushes)."""
    tracer.close()
    return receiver.spans()


@pytest.fixture
def caches():
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(3, 8, 2, 16, 16, generator=generator)
    return LayerCaches([buffer[i] for i in range(3)])


@pytest.fixture
def chunks():
    return prompt_chunks(KeyIdentity("test-model", "float32", LAYOUT.name, 32), range(TOKENS))


@pytest.fixture
def backend():
    server = StoreServer(ServerSettings(capacity=32 << 20, port=0, shm_name=unique_name()))
    server.start()
    client = open_backend(server.shm_url)
    yield client
    client.close()
    server.stop()


def saver_of(caches, backend, tracer, **options) -> KVSaver:
    return KVSaver(lambda: backend, ChunkCodec("naive"), LAYOUT, caches, rank=0,
                   counters=Counters(), guard=StoreGuard("test"), tracer=tracer,
                   **options)  # fmt: skip


def load(chunks, backend, tracer, trace=TRACEPARENT) -> None:
    target = LayerCaches([torch.zeros(8, 2, 16, 16) for _ in range(3)])
    loader = KVLoader(lambda: backend, LAYOUT, target, rank=0, guard=StoreGuard("test"),
                      counters=Counters(), tracer=tracer)  # fmt: skip
    loader.submit([LoadPlan("load", chunks, 0, TOKENS - 1, BLOCKS, None, trace)])
    deadline = time.monotonic() + 30  # a hang guard
    while not loader.finished()[0] and time.monotonic() < deadline:
        loader.wait_idle(0.1)
    loader.close()


def test_a_requests_traceparent_reaches_its_load_and_save_plans():
    request = Request("r", PROMPT, SamplingParams(max_tokens=1), None,
                      trace_headers={"traceparent": TRACEPARENT})  # fmt: skip
    assert request_traceparent(request) == TRACEPARENT
    assert request_traceparent(Request("u", PROMPT, SamplingParams(), None)) is None

    consumer = planner(all_keys())
    consumer.admit("r", NO_EXTRAS, request_traceparent(request))
    consumer.allocated("r", [1, 2, 3], consumer.match("r", PROMPT, 0))
    (load_plan,) = consumer.begin_step(idle=False).loads
    assert load_plan.trace == TRACEPARENT

    producer = planner(loads=False, saves=True)
    producer.admit("r", NO_EXTRAS, TRACEPARENT)
    producer.admit("u", NO_EXTRAS)
    step = producer.begin_step(idle=False)
    producer.new_request("r", PROMPT, [4, 5, 6], 0, len(PROMPT), step)
    producer.new_request("u", PROMPT, [7, 8, 9], 0, len(PROMPT), step)
    assert {plan.req_id: plan.trace for plan in step.saves} == {"r": TRACEPARENT, "u": None}
    # The plan crosses to the workers as the step's metadata (pickled between processes).
    crossed = pickle.loads(pickle.dumps(SplitwiseMetadata(step)))
    assert crossed.plan.saves[0].trace == TRACEPARENT
    producer.finished("r")
    producer.admit("r", NO_EXTRAS)  # the same id again, untraced now
    step = producer.begin_step(idle=False)
    producer.new_request("r", PROMPT, [4, 5, 6], 0, len(PROMPT), step)
    assert step.saves[0].trace is None


def test_no_tracer_without_the_endpoint_vllm_sets():
    assert ConnectorTracer.from_environment({}) is None
    assert ConnectorTracer.from_environment({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"}) is None


def test_a_save_and_a_load_are_children_of_the_requests_trace(
    caches, chunks, backend, tracer, receiver
):
    saver = saver_of(caches, backend, tracer)
    saver.save([SavePlan("save", chunks, BLOCKS, True, TRACEPARENT)])
    saver.close()
    load(chunks, backend, tracer)
    spans = {span.name: span for span in exported(tracer, receiver)}
    assert set(spans) == {"splitwise.save", "splitwise.load"}
    for span in spans.values():
        assert (span.trace_id, span.parent_id) == (TRACE, PARENT)
        assert span.service == "decode-engine" and span.error is None
        assert 0 < span.start_ns <= span.end_ns
    save, load_span = spans["splitwise.save"], spans["splitwise.load"]
    assert save.attributes["splitwise.tokens"] == TOKENS
    assert save.attributes["splitwise.chunks"] == len(chunks)
    assert save.attributes["splitwise.bytes"] > TOKENS * CHUNK_BYTES // 32
    assert save.attributes["splitwise.already_stored"] == 0
    assert save.attributes["splitwise.completes_prompt"] is True
    assert save.end_ns <= load_span.start_ns
    assert load_span.attributes["splitwise.tokens"] == TOKENS - 1
    assert load_span.attributes["splitwise.hit"] is True
    assert load_span.attributes["splitwise.chunks"] == len(chunks)
    assert load_span.attributes["splitwise.bytes"] == save.attributes["splitwise.bytes"]


def test_a_missing_chunk_makes_a_failed_load_span(caches, chunks, backend, tracer, receiver):
    saver = saver_of(caches, backend, None)  # saved untraced
    saver.save([SavePlan("save", chunks, BLOCKS, True)])
    saver.close()
    backend.delete(chunks[1].key)
    load(chunks, backend, tracer)
    (span,) = exported(tracer, receiver)
    assert span.name == "splitwise.load"
    assert span.error == "chunk 32-64 missing" == span.attributes["splitwise.failure"]
    assert span.attributes["splitwise.hit"] is False
    assert (span.attributes["splitwise.tokens"], span.attributes["splitwise.chunks"]) == (32, 1)


def test_a_dropped_save_is_a_failed_span_and_untraced_requests_have_none(
    caches, chunks, backend, tracer, receiver
):
    saver = saver_of(caches, backend, tracer, queue_bytes=CHUNK_BYTES)  # room for one chunk
    saver.save([SavePlan("big", chunks, BLOCKS, True, TRACEPARENT)])
    saver.save([SavePlan("untraced", chunks[:1], BLOCKS)])
    saver.close()
    (span,) = exported(tracer, receiver)
    assert span.name == "splitwise.save" and span.parent_id == PARENT
    assert span.error is not None and span.error.startswith("save queue full")
    assert span.attributes["splitwise.planned_tokens"] == TOKENS
    assert "splitwise.tokens" not in span.attributes
