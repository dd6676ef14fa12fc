"""The launcher start to stop with real child processes, fast: the engines are fake_vllm's.

Each test runs `python -m splitwise_local` as a user would. The real store and the real proxy
run; only `python -m vllm.entrypoints.openai.api_server` is the stand-in from fake_vllm/, which
starts in a second, records when it got SIGTERM and what was still up, and leaves helper
processes behind the way vLLM's engine core would.
"""

from __future__ import annotations

import signal
import socket
import time

import httpx
import psutil
import pytest

from splitwise_local.samples import SAMPLES, ask, chat_request, served_model
from splitwise_local.serve.ports import bind_problem
from splitwise_local.serve.process import alive
from splitwise_testing import scrape
from tests.serve.helpers import READY, Ports, events, launch_fake, leftovers

pytestmark = pytest.mark.timeout(120)
HANG_GUARD_S = 60.0  # a deadline only a hang reaches: what it guards takes seconds


def test_serves_then_stops_proxy_engines_store_in_order(tmp_path, ports, fake_model, launched):
    system = launch_fake(tmp_path, ports, fake_model, "--log-level", "info")
    launched.append(system)
    system.wait_for(READY, 60)
    url = f"http://127.0.0.1:{ports.proxy}"
    assert f"curl {url}/v1/chat/completions" in system.out
    with httpx.Client(timeout=30) as client:
        model = served_model(client, url)
        assert model == fake_model.name  # the launcher names the model after its folder
        for stream in (False, True):
            assert ask(client, url, chat_request(model, SAMPLES[0], stream)).strip()

    assert system.finish(signal.SIGTERM) == 0
    terms = events(tmp_path / "events.jsonl")
    assert sorted(e["port"] for e in terms) == sorted([ports.prefill, ports.decode])
    assert all(not e["proxy_up"] for e in terms), "engines stopped before the proxy"
    assert all(e["store_up"] for e in terms), "store stopped before the engines"
    out = system.out
    assert out.index("proxy stopped") < out.index("stopping prefill engine, decode engine")
    assert out.index("stopping prefill engine, decode engine") < out.index("stopping store")
    assert f"[decode engine] INFO fake engine on port {ports.decode}" in out
    # What an engine prints once told to stop goes to its log, not to the console.
    assert "Shutting down" in (system.run_dir / "decode.log").read_text()
    assert not [line for line in out.splitlines() if "engine] INFO:     Shutting down" in line]
    assert leftovers(system.run_dir) == []
    for log in ("store.log", "prefill.log", "decode.log", "proxy.log"):
        assert (system.run_dir / log).stat().st_size > 0, log
    assert "GET /v1/models" in (system.run_dir / "proxy.log").read_text()


def test_broken_model_folder_is_one_error_and_starts_nothing(tmp_path, ports, launched):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    system = launch_fake(tmp_path, ports, empty)
    launched.append(system)
    assert system.finish(timeout=30) == 1
    assert system.err.strip().splitlines() == [
        f"[launcher] error: {empty} has no config.json: not a Hugging Face checkpoint folder"
    ]
    assert not system.run_dir.exists()
    assert leftovers(system.run_dir) == []


def test_port_in_use_is_named_before_anything_starts(tmp_path, ports, fake_model, launched):
    with socket.create_server(("127.0.0.1", ports.decode)):
        system = launch_fake(tmp_path, ports, fake_model)
        launched.append(system)
        assert system.finish(timeout=30) == 1
    assert system.err.strip().splitlines() == [
        f"[launcher] error: port {ports.decode} for the decode engine is in use "
        "(choose another: --decode-port)"
    ]
    assert "starting" not in system.out
    assert leftovers(system.run_dir) == []


def test_engine_crash_at_startup_stops_the_rest(tmp_path, ports, fake_model, launched):
    system = launch_fake(tmp_path, ports, fake_model, modes={ports.decode: "crash"})
    launched.append(system)
    assert system.finish(timeout=60) == 1
    assert (
        "error: decode engine exited (1) before it was ready "
        "(RuntimeError: fake engine cannot load the model); last lines of"
    ) in system.err
    assert "  | ERROR fake engine: giving up" in system.err  # the log's tail
    # The default console level shows the engine's errors, not its info lines.
    assert "[decode engine] ERROR fake engine: giving up" in system.out
    assert "[decode engine] RuntimeError: fake engine cannot load the model" in system.out
    assert "[decode engine] INFO" not in system.out
    assert leftovers(system.run_dir) == []


def test_engine_that_never_answers_times_out_by_name(tmp_path, ports, fake_model, launched):
    modes = {ports.prefill: "hang"}
    system = launch_fake(tmp_path, ports, fake_model, "--startup-timeout", "3", modes=modes)
    launched.append(system)
    assert system.finish(timeout=60) == 1
    assert (
        f"error: prefill engine was not ready within 3 s "
        f"(GET http://127.0.0.1:{ports.prefill}/health never succeeded)"
    ) in system.err
    assert f"fake engine on port {ports.prefill}, mode hang" in system.err
    assert leftovers(system.run_dir) == []


def test_child_death_while_serving_stops_everything(tmp_path, ports, fake_model, launched):
    system = launch_fake(tmp_path, ports, fake_model, "--restart", "never")
    launched.append(system)
    system.wait_for(READY, 60)
    system.child(f"--port {ports.decode}").send_signal(signal.SIGKILL)
    assert system.finish(timeout=60) == 1
    assert "decode engine was killed by signal 9 while serving, so everything stops" in system.err
    assert f"  | INFO fake engine on port {ports.decode}" in system.err  # its log's tail
    assert leftovers(system.run_dir) == []


def test_engine_ignoring_sigterm_is_killed_after_the_grace(tmp_path, ports, fake_model, launched):
    """The stubborn engine lives on through its SIGTERM and never exits by itself: the launcher
    stopping cleanly at all, with that engine gone, shows it killed it instead of waiting."""
    modes = {ports.prefill: "stubborn"}
    system = launch_fake(tmp_path, ports, fake_model, "--stop-grace", "1", modes=modes)
    launched.append(system)
    system.wait_for(READY, 60)
    (stubborn,) = [p for p in system.processes("prefill engine") if p.ppid() == system.popen.pid]
    assert system.finish(signal.SIGTERM, timeout=HANG_GUARD_S) == 0
    assert ports.prefill in [e["port"] for e in events(tmp_path / "events.jsonl")]  # asked first
    assert not stubborn.is_running()
    assert leftovers(system.run_dir) == []


def test_ctrl_c_during_startup_stops_what_started(tmp_path, ports, fake_model, launched):
    system = launch_fake(tmp_path, ports, fake_model, modes={ports.decode: "hang"})
    launched.append(system)
    system.wait_for("starting decode engine", 60)
    deadline = time.monotonic() + HANG_GUARD_S
    while len(system.processes("decode engine")) < 3:  # the hanging engine and its two helpers
        assert time.monotonic() < deadline, "the decode engine started no helpers"
        time.sleep(0.1)
    assert system.finish(signal.SIGINT) == 0
    assert "SIGINT received" in system.out
    assert leftovers(system.run_dir) == []


def engine_requests(url: str) -> dict[str, float]:
    """The proxy's per-engine request counts, by engine URL."""
    found = scrape.samples(url, "splitwise_proxy_engine_requests_total")
    return {labels["engine"]: value for labels, value in found}


@pytest.mark.parametrize("prefill, decode", [(2, 1), (1, 2)], ids=["2P1D", "1P2D"])
def test_xpyd_starts_uses_and_stops_every_engine(tmp_path, fake_model, launched, prefill, decode):
    ports = Ports.for_engines(prefill, decode)
    counts = ["--prefill", str(prefill), "--decode", str(decode)]
    system = launch_fake(tmp_path, ports, fake_model, *counts)
    launched.append(system)
    system.wait_for(READY, 60)
    engine_ports = {
        "prefill": [ports.prefill + i for i in range(prefill)],
        "decode": [ports.decode + i for i in range(decode)],
    }
    out = system.out
    for role, role_ports in engine_ports.items():
        for index, port in enumerate(role_ports):
            name = f"{role} engine {index}" if len(role_ports) > 1 else f"{role} engine"
            log = f"{role}-{index}.log" if len(role_ports) > 1 else f"{role}.log"
            # Every engine's port is printed with its placement; on two cores a role shares.
            assert f"  {name}: http://127.0.0.1:{port} (CPU cores " in out, out
            assert f"log {log})" in out
            assert (system.run_dir / log).stat().st_size > 0
    url = f"http://127.0.0.1:{ports.proxy}"
    with httpx.Client(timeout=30) as client:
        model = served_model(client, url)
        for stream in (False, True, False, True):
            assert ask(client, url, chat_request(model, SAMPLES[0], stream)).strip()
    requests = engine_requests(url)
    for port in engine_ports["prefill"] + engine_ports["decode"]:
        assert requests.get(f"http://127.0.0.1:{port}", 0) >= 1, requests

    assert system.finish(signal.SIGTERM) == 0
    stopped = sorted(e["port"] for e in events(tmp_path / "events.jsonl"))
    assert stopped == sorted(engine_ports["prefill"] + engine_ports["decode"])
    assert leftovers(system.run_dir) == []


def busy_ports(ports: Ports) -> list[int]:
    every = [ports.proxy, ports.prefill, ports.decode, ports.store, ports.store_metrics]
    return [port for port in every if bind_problem("127.0.0.1", port) is not None]


def test_kill_9_of_the_launcher_leaves_nothing_and_the_next_start_succeeds(
    tmp_path, ports, fake_model, launched
):
    system = launch_fake(tmp_path, ports, fake_model)
    launched.append(system)
    system.wait_for(READY, 60)
    processes = psutil.Process(system.popen.pid).children(recursive=True)
    assert len(system.processes()) >= 7  # store, two engines and their four helpers
    system.finish(signal.SIGKILL)
    deadline = time.monotonic() + HANG_GUARD_S
    while (alive(processes) or busy_ports(ports)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(processes) == []  # the guardian included, once its work is done
    assert busy_ports(ports) == []
    assert f"[guardian] process {system.popen.pid} exited with" in system.err

    again = launch_fake(tmp_path / "again", ports, fake_model)
    launched.append(again)
    again.wait_for(READY, 60)
    assert again.finish(signal.SIGTERM) == 0
    assert leftovers(again.run_dir) == []


def test_next_start_kills_and_names_what_a_dead_launcher_left(
    tmp_path, ports, fake_model, launched
):
    """An engine that ignores SIGTERM outlives its parent-death signal; with the guardian killed
    too (one kill for the whole machine's worth), only the next launch can free its port."""
    system = launch_fake(tmp_path, ports, fake_model, modes={ports.prefill: "stubborn"})
    launched.append(system)
    system.wait_for(READY, 60)
    (stubborn,) = [p for p in system.processes("prefill engine") if p.ppid() == system.popen.pid]
    system.child("splitwise_local.serve.guardian").kill()
    system.finish(signal.SIGKILL)
    deadline = time.monotonic() + HANG_GUARD_S  # the rest stops on its parent-death signal
    while busy_ports(ports) != [ports.prefill] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stubborn.is_running() and busy_ports(ports) == [ports.prefill]

    again = launch_fake(tmp_path / "again", ports, fake_model)
    launched.append(again)
    again.wait_for(READY, 60)
    assert "an earlier run left running when its launcher died: " in again.out
    assert f"prefill engine (pid {stubborn.pid})" in again.out
    assert leftovers(system.run_dir) == []
    assert again.finish(signal.SIGTERM) == 0
    assert leftovers(again.run_dir) == []
