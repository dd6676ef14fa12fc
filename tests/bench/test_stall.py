"""The benchmarks' background stream: it waits for its first tokens, a stream that fails or never
starts is an error within the deadline, not a benchmark that hangs, and a disturbed stream's gaps
are split at the disturbance."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from splitwise_bench.stall import Stream, disturbed_stream
from splitwise_testing.fake_engine import FakeBehaviour, FakeEngine
from tests.proxy.servers import Servers


@pytest.fixture
def engine() -> Iterator[tuple[FakeBehaviour, str]]:
    servers = Servers()
    behaviour = FakeBehaviour(tokens=20, token_interval_s=0.01)
    try:
        yield behaviour, servers.serve(FakeEngine(behaviour).app)
    finally:
        servers.stop()


def test_waits_for_the_first_tokens_then_runs_to_the_end(engine):
    behaviour, url = engine
    stream = Stream(url, behaviour.model, [1, 2, 3], tokens=20)
    stream.wait_started(8, timeout=10)
    assert 8 <= len(stream.arrivals) < 20
    stream.join()
    assert len(stream.arrivals) == 20


def test_a_stream_that_does_not_start_in_time_is_a_timeout(engine):
    behaviour, url = engine
    behaviour.delay_s = 2
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="0 of 8 tokens"):
        Stream(url, behaviour.model, [1], tokens=20).wait_started(8, timeout=0.5)
    assert time.monotonic() - began < 3


@pytest.mark.parametrize("fault", ["status 500", "too short"])
def test_a_failed_or_short_stream_is_an_error(engine, fault):
    behaviour, url = engine
    if fault == "status 500":
        behaviour.fail_status = 500
    stream = Stream(url, behaviour.model, [1], tokens=4 if fault == "too short" else 20)
    match = "500" if fault == "status 500" else "ended after 4 tokens"
    with pytest.raises(RuntimeError, match=match):
        stream.wait_started(8, timeout=10)


def test_a_disturbed_streams_gaps_are_split_at_the_disturbance(engine):
    behaviour, url = engine
    behaviour.tokens = 40
    gaps = disturbed_stream(url, behaviour.model, [1, 2], 40, 10, lambda: time.sleep(0.1), 10)
    assert len(gaps.quiet) == 9  # the gaps between the first 10 tokens
    assert gaps.during and len(gaps.during) < 40 - 10
    assert gaps.disturbance_s > 0


def test_a_stream_that_ends_before_the_disturbance_is_an_error(engine):
    behaviour, url = engine
    behaviour.tokens = 12
    with pytest.raises(RuntimeError, match="ended before the disturbance"):
        disturbed_stream(url, behaviour.model, [1], 12, 10, lambda: time.sleep(1), 10)
