"""The benchmarks' background stream: it waits for its first tokens, a stream that fails or never
starts is an error within the deadline, not a benchmark that hangs, and a disturbed stream's gaps
are split at the disturbance.

Where a count of tokens matters, the server sends them in batches the test releases, so what the
client has seen depends on the test's steps, not on how fast this machine is."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from splitwise_bench import stall
from splitwise_bench.stall import Stream, disturbed_stream
from splitwise_testing.fake_engine import FakeBehaviour, FakeEngine

HANG_GUARD_S = 60  # a deadline only a hang reaches: each wait below takes milliseconds
pytestmark = pytest.mark.timeout(4 * HANG_GUARD_S)
TOKEN = 'data: {"choices": [{"index": 0, "text": " t", "finish_reason": null}]}\n\n'


class Batches:
    """A completion stream sent in batches of tokens: the first at once, batch i on `release(i)`."""

    def __init__(self, *sizes: int) -> None:
        self.sizes = sizes
        self.gates = [threading.Event() for _ in sizes]
        self.gates[0].set()
        self.app = Starlette(routes=[Route("/v1/completions", self._complete, methods=["POST"])])

    def release(self, batch: int) -> None:
        self.gates[batch].set()

    def release_all(self) -> None:
        for gate in self.gates:
            gate.set()

    async def _complete(self, request: Request) -> StreamingResponse:
        return StreamingResponse(self._tokens(), media_type="text/event-stream")

    async def _tokens(self) -> AsyncIterator[str]:
        for size, gate in zip(self.sizes, self.gates, strict=True):
            while not gate.is_set():
                await asyncio.sleep(0.005)
            for _ in range(size):
                yield TOKEN
        yield "data: [DONE]\n\n"


@pytest.fixture
def engine(servers) -> tuple[FakeBehaviour, str]:
    behaviour = FakeBehaviour(tokens=20, token_interval_s=0.01)
    return behaviour, servers.serve(FakeEngine(behaviour).app)


@pytest.fixture
def batches(servers) -> Iterator[Callable[..., tuple[Batches, str]]]:
    """`server, url = batches(10, 5)`; every batch is let go at the end so no stream is left."""
    made: list[Batches] = []

    def start(*sizes: int) -> tuple[Batches, str]:
        made.append(Batches(*sizes))
        return made[-1], servers.serve(made[-1].app)

    yield start
    for server in made:
        server.release_all()


def watch(monkeypatch: pytest.MonkeyPatch, server: Batches) -> list[Stream]:
    """The streams `disturbed_stream` starts, for a disturbance to see their tokens arrive; once
    it waits for a stream's end (the disturbance is over), `server` sends all it still holds."""
    started: list[Stream] = []

    class Watched(Stream):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

        def join(self) -> None:
            server.release_all()
            super().join()

    monkeypatch.setattr(stall, "Stream", Watched)
    return started


def wait_for_tokens(stream: Stream, count: int) -> None:
    deadline = time.monotonic() + HANG_GUARD_S
    while len(stream.arrivals) < count:
        assert time.monotonic() < deadline, f"{len(stream.arrivals)} of {count} tokens came"
        time.sleep(0.005)


def test_waits_for_the_first_tokens_then_runs_to_the_end(batches):
    server, url = batches(8, 12)
    stream = Stream(url, "fake-model", [1, 2, 3], tokens=20)
    stream.wait_started(8, timeout=HANG_GUARD_S)
    assert len(stream.arrivals) == 8  # returned while the rest was still held back
    server.release(1)
    stream.join()
    assert len(stream.arrivals) == 20


def test_a_stopped_stream_ends_at_its_next_token(batches):
    server, url = batches(8, 1, 11)
    stream = Stream(url, "fake-model", [1, 2, 3], tokens=20)
    stream.wait_started(8, timeout=HANG_GUARD_S)
    stopping = threading.Thread(target=stream.stop)
    stopping.start()  # it waits for the next token, which the server still holds
    server.release(1)
    stopping.join(HANG_GUARD_S)
    assert not stopping.is_alive()
    assert len(stream.arrivals) == 9  # the eleven tokens after the stop were never read


def test_stopping_a_stream_that_had_ended_is_an_error(engine):
    """Its gaps stop short of what the caller meant to measure."""
    behaviour, url = engine
    stream = Stream(url, behaviour.model, [1], tokens=4)
    stream.join()
    with pytest.raises(RuntimeError, match="ended after 4 tokens"):
        stream.stop()


def test_a_stream_that_does_not_start_in_time_is_a_timeout(engine):
    """The engine holds its answer until the test ends: only the deadline can end the wait."""
    behaviour, url = engine
    behaviour.hold = threading.Event()
    try:
        with pytest.raises(TimeoutError, match="0 of 8 tokens"):
            Stream(url, behaviour.model, [1], tokens=20).wait_started(8, timeout=0.5)
    finally:
        behaviour.hold.set()


@pytest.mark.parametrize("fault", ["status 500", "too short"])
def test_a_failed_or_short_stream_is_an_error(engine, fault):
    behaviour, url = engine
    if fault == "status 500":
        behaviour.fail_status = 500
    stream = Stream(url, behaviour.model, [1], tokens=4 if fault == "too short" else 20)
    match = "500" if fault == "status 500" else "ended after 4 tokens"
    with pytest.raises(RuntimeError, match=match):
        stream.wait_started(8, timeout=HANG_GUARD_S)


def test_a_disturbed_streams_gaps_are_split_at_the_disturbance(batches, monkeypatch):
    """Tokens 11-15 come during the disturbance, 16-40 once it is over."""
    server, url = batches(10, 5, 25)
    streams = watch(monkeypatch, server)

    def disturb() -> None:
        server.release(1)
        wait_for_tokens(streams[0], 15)

    gaps = disturbed_stream(url, "fake-model", [1, 2], 40, 10, disturb, HANG_GUARD_S)
    assert len(gaps.quiet) == 9  # the gaps between the first 10 tokens
    # The gaps ending at tokens 11-15, and the one the disturbance ended in (to token 16).
    assert len(gaps.during) == 6
    assert gaps.disturbance_s > 0


def test_a_stream_that_ends_before_the_disturbance_is_an_error(batches, monkeypatch):
    server, url = batches(10, 2)
    streams = watch(monkeypatch, server)

    def disturb() -> None:
        server.release(1)
        streams[0].join()  # the stream has ended while the disturbance still runs

    with pytest.raises(RuntimeError, match="ended before the disturbance"):
        disturbed_stream(url, "fake-model", [1], 12, 10, disturb, HANG_GUARD_S)
