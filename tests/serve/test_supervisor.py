"""The supervisor (serve/supervisor.py) on real children: fake_vllm's engines, started the way the
launcher starts vLLM. A child that dies, freezes or says it cannot serve is restarted after its
back-off, and listeners hear of the death and the return; too many restarts, or any death under
`never`, give up; a child that fails to start is one error naming it; stages stop newest first."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise_local.serve.console import Console
from splitwise_local.serve.engine import EngineSpec
from splitwise_local.serve.ports import free_ports
from splitwise_local.serve.probes import engine_healthy
from splitwise_local.serve.process import RUN_ENV, Child
from splitwise_local.serve.supervisor import (
    ChildEvent,
    Readiness,
    RestartPolicy,
    StartupError,
    Supervisor,
)
from tests.serve.helpers import FAKE_VLLM, TRIGGER

pytestmark = pytest.mark.timeout(180)
START_TIMEOUT_S = 60.0  # a hang guard: a fake engine starts in a second or two
QUICK = RestartPolicy(health_interval_s=0.2, backoff_initial_s=0.1, ready_timeout_s=60)


class Events:
    """What the supervisor told its listeners, and a way to wait for the next one."""

    def __init__(self) -> None:
        self.seen: list[ChildEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: ChildEvent) -> None:
        with self._changed:
            self.seen.append(event)
            self._changed.notify_all()

    def wait_for(self, count: int) -> list[ChildEvent]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.seen) >= count, 60), self.seen
            return list(self.seen)


class Engines:
    """Fake engines as supervised children of one run, and the supervisor that owns them."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.console = Console(out=io.StringIO(), err=io.StringIO())
        self.supervisor = Supervisor(self.console, str(run_dir), stop_grace=5)
        self.events = Events()
        self.supervisor.listen(self.events)

    def engine(self, name: str, mode: str = "ok", store_port: int | None = None):
        """A fake engine child in `mode` (fake_vllm's), with vLLM's /health as its readiness;
        `store_port` is what its SIGTERM record says was still up."""
        (port,) = free_ports(1)
        spec = EngineSpec(model=self.run_dir, port=port, role="plain", dtype="bfloat16")
        env = {
            **os.environ,
            RUN_ENV: str(self.run_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(FAKE_VLLM), os.getenv("PYTHONPATH")])),
            "FAKE_ENGINE_EVENTS": str(self.run_dir / "events.jsonl"),
            "FAKE_ENGINE_TRIGGER": str(self.run_dir / TRIGGER),
            f"FAKE_ENGINE_MODE_{port}": mode,
        }
        if store_port is not None:
            env["FAKE_STORE_PORT"] = str(store_port)
        child = Child(name, spec.command(), env, self.run_dir / f"{name}.log", self.console)
        health = f"{spec.url}/health"
        return child, Readiness(lambda: engine_healthy(health), f"GET {health}"), port

    def sigterms(self) -> list[dict]:
        path = self.run_dir / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    @property
    def said(self) -> str:
        return self.console._out.getvalue()  # type: ignore[union-attr]


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    started = Engines(tmp_path)
    yield started
    started.supervisor.stop_all()


def start(engines: Engines, *members) -> None:
    engines.supervisor.start_stage([(child, ready) for child, ready, _ in members], START_TIMEOUT_S)


def test_a_killed_child_is_restarted_and_listeners_hear_it_go_and_return(engines):
    child, ready, _ = member = engines.engine("decode engine")
    start(engines, member)
    engines.supervisor.supervise(QUICK)
    os.kill(child.pid, signal.SIGKILL)
    down, up = engines.events.wait_for(2)
    assert (down.child, down.up, down.cause) == (child, False, "was killed by signal 9")
    assert (up.child, up.up) == (child, True)
    assert child.starts == 2 and ready.ready()
    counts, states = engines.supervisor.restart_counts()
    assert counts == {("decode engine", "killed"): 1} and states == {"decode engine": True}
    assert "decode engine was killed by signal 9; restarting it in 0 s (restart 1 of" in (
        engines.said
    )


def test_a_frozen_child_is_restarted_once_its_health_deadline_passes(engines):
    child, _, _ = member = engines.engine("prefill engine")
    start(engines, member)
    engines.supervisor.supervise(
        RestartPolicy(health_interval_s=0.2, backoff_initial_s=0.1, health_deadline_s=1.0)
    )
    os.kill(child.pid, signal.SIGSTOP)
    down, up = engines.events.wait_for(2)
    assert down.cause.startswith("has not answered its health check (GET http://127.0.0.1:")
    assert up.up and child.starts == 2
    assert engines.supervisor.restart_counts()[0] == {("prefill engine", "frozen"): 1}


def test_a_child_that_says_it_cannot_serve_is_restarted_without_waiting_for_the_deadline(engines):
    member = engines.engine("decode engine", "sick")
    start(engines, member)
    # A deadline longer than the test's own timeout: only the 503 can explain a restart.
    engines.supervisor.supervise(
        RestartPolicy(health_interval_s=0.2, backoff_initial_s=0.1, health_deadline_s=3600)
    )
    (engines.run_dir / TRIGGER).touch()
    down = engines.events.wait_for(1)[0]
    assert down.cause.startswith("said it cannot serve (GET http://127.0.0.1:")
    assert down.cause.endswith("answered 503: its engine core is gone)")


def test_too_many_restarts_give_up_and_name_the_cause(engines):
    child, _, _ = member = engines.engine("decode engine", "flaky")
    start(engines, member)
    (engines.run_dir / TRIGGER).touch()
    engines.supervisor.supervise(
        RestartPolicy(health_interval_s=0.2, backoff_initial_s=0.1, max_restarts=1)
    )
    assert engines.supervisor.failed.wait(START_TIMEOUT_S)
    failure = engines.supervisor.failure or ""
    assert failure.startswith(
        "decode engine exited (1) (RuntimeError: fake engine lost its device)"
    )
    assert "after 1 restarts within 600 s; giving up" in failure
    assert child.starts == 2


def test_under_never_the_first_death_stops_the_supervision(engines):
    child, _, _ = member = engines.engine("decode engine")
    start(engines, member)
    engines.supervisor.supervise(RestartPolicy(mode="never"))
    os.kill(child.pid, signal.SIGKILL)
    assert engines.supervisor.failed.wait(START_TIMEOUT_S)
    assert (engines.supervisor.failure or "").startswith(
        "decode engine was killed by signal 9 while serving, so everything stops"
    )
    assert child.starts == 1


@pytest.mark.parametrize(
    ("mode", "timeout", "message"),
    [
        ("crash", START_TIMEOUT_S, "prefill engine exited (1) before it was ready (RuntimeError"),
        ("hang", 2.0, "prefill engine was not ready within 2 s (GET http://127.0.0.1:"),
    ],
)
def test_a_child_that_does_not_start_is_one_error_naming_it(engines, mode, timeout, message):
    child, ready, _ = engines.engine("prefill engine", mode)
    with pytest.raises(StartupError) as caught:
        engines.supervisor.start_stage([(child, ready)], timeout)
    assert str(caught.value).startswith(message)
    assert f"last lines of {child.log_path}:\n  | " in str(caught.value)


def test_stages_stop_newest_first(engines):
    first = engines.engine("store")
    second = engines.engine("decode engine", store_port=first[2])
    start(engines, first)
    start(engines, second)
    engines.supervisor.stop_all()
    sigterms = engines.sigterms()
    assert [event["port"] for event in sigterms] == [second[2], first[2]]
    assert sigterms[0]["store_up"], "the first stage stopped before the second"
    assert not first[0].running and not second[0].running
