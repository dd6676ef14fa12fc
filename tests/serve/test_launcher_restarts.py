"""The restart policy, with real child processes, fast: the engines are fake_vllm's.

`--restart on-failure` (the default): a child killed, crashed or frozen while serving is
restarted after a back-off, its death logged with the cause and the tail of its log and counted
in /metrics, and the proxy routes around it meanwhile. Too many restarts in the window stop
everything with exit 1. (`--restart never`: test_launcher_lifecycle.py. Real engines:
tests/chaos/.)
"""

from __future__ import annotations

import signal

import httpx
import pytest

from splitwise_local.samples import SAMPLES, ask, chat_request
from splitwise_local.serve.process import tagged
from splitwise_testing.launch import open_store
from splitwise_testing.scrape import total, value
from tests.serve.helpers import READY, TRIGGER, launch_fake, leftovers

pytestmark = pytest.mark.timeout(120)


def restarts(url: str, component: str, cause: str) -> float:
    """The restarts of `component` for `cause` that the proxy's /metrics counts."""
    return total(url, "splitwise_component_restarts_total", component=component, cause=cause)


def component_processes(run_dir, component: str) -> int:
    return len(tagged(str(run_dir), component))


def test_killed_engine_is_restarted_while_prefill_serves(tmp_path, ports, fake_model, launched):
    system = launch_fake(tmp_path, ports, fake_model)
    launched.append(system)
    system.wait_for(READY, 60)
    url = f"http://127.0.0.1:{ports.proxy}"
    decode = system.child(f"--port {ports.decode}")
    with_helpers = component_processes(system.run_dir, "decode engine")
    decode.send_signal(signal.SIGKILL)
    system.wait_for("decode engine was killed by signal 9; restarting it in 1 s", 10)
    # Meanwhile the prefill engine answers whole requests.
    with httpx.Client(timeout=30) as client:
        request = chat_request(fake_model.name, SAMPLES[0])
        assert ask(client, url, request).strip()
        assert "decode engine is back after" not in system.out
        assert value(url, "splitwise_proxy_decode_fallbacks_total") == 1
        assert value(url, "splitwise_component_up", component="decode engine") == 0
        # The supervisor told the proxy: it never even tried the dead engine.
        decode_url = f"http://127.0.0.1:{ports.decode}"
        assert value(url, "splitwise_proxy_engine_up", engine=decode_url, role="decode") == 0
        failures = "splitwise_proxy_engine_failures_total"
        assert value(url, failures, engine=decode_url, role="decode") == 0
        system.wait_for("decode engine is back after", 30)
        assert restarts(url, "decode engine", "killed") == 1
        assert value(url, "splitwise_component_up", component="decode engine") == 1
        # The proxy was told: the next request goes to decode again (prefill, then decode).
        assert ask(client, url, chat_request(fake_model.name, SAMPLES[0], stream=True)).strip()
        assert value(url, "splitwise_proxy_decode_fallbacks_total") == 1
    out = system.out
    assert f"  | INFO fake engine on port {ports.decode}" in out  # the log's tail, quoted
    assert "(restart 1 of at most 5 within 600 s)" in out
    log = (system.run_dir / "decode.log").read_text()
    assert "----- restart 1: decode engine was killed by signal 9 -----" in log
    # What the killed engine left (its helper processes) went with it.
    assert component_processes(system.run_dir, "decode engine") == with_helpers
    assert system.finish(signal.SIGTERM) == 0
    assert leftovers(system.run_dir) == []


def test_frozen_engine_is_restarted(tmp_path, ports, fake_model, launched):
    system = launch_fake(tmp_path, ports, fake_model, "--health-deadline", "3")
    launched.append(system)
    system.wait_for(READY, 60)
    url = f"http://127.0.0.1:{ports.proxy}"
    prefill = system.child(f"--port {ports.prefill}")
    before = len(system.out)  # only what the launcher says after the freeze counts
    prefill.send_signal(signal.SIGSTOP)
    said = system.wait_for(
        f"prefill engine has not answered its health check "
        f"(GET http://127.0.0.1:{ports.prefill}/health) for ",
        60,
        after=before,
    )
    silent_s = int(system.out[said:].split(" s", 1)[0])
    assert silent_s >= 3  # restarted once the health deadline had passed, not before
    with httpx.Client(timeout=30) as client:  # decode computes the prompt meanwhile
        assert ask(client, url, chat_request(fake_model.name, SAMPLES[0])).strip()
        system.wait_for("prefill engine is back after", 30)
        assert restarts(url, "prefill engine", "frozen") == 1
    assert not prefill.is_running()  # the frozen one was killed, not left stopped
    assert system.finish(signal.SIGTERM) == 0
    assert leftovers(system.run_dir) == []


def test_killed_store_is_restarted_empty(tmp_path, ports, fake_model, launched):
    system = launch_fake(tmp_path, ports, fake_model)
    launched.append(system)
    system.wait_for(READY, 60)
    store = open_store(system.run_dir)
    store.put("k" * 64, b"value")
    assert store.stats()["items"] == 1
    system.child("splitwise_local store").send_signal(signal.SIGKILL)
    system.wait_for("store is back after", 30)
    assert store.get("k" * 64) is None  # the same client reconnected; the store is empty
    assert store.stats()["items"] == 0
    store.close()
    assert restarts(f"http://127.0.0.1:{ports.proxy}", "store", "killed") == 1
    assert system.finish(signal.SIGTERM) == 0
    assert leftovers(system.run_dir) == []


def test_too_many_restarts_stop_everything(tmp_path, ports, fake_model, launched):
    modes = {ports.decode: "flaky"}
    system = launch_fake(tmp_path, ports, fake_model, "--max-restarts", "2", modes=modes)
    launched.append(system)
    system.wait_for(READY, 60)
    (tmp_path / TRIGGER).touch()
    assert system.finish(timeout=60) == 1
    assert (
        "error: decode engine exited (1) (RuntimeError: fake engine lost its device), after 2 "
        "restarts within 600 s; giving up, so everything stops"
    ) in system.err
    assert "restarting it in 1 s (restart 1 of at most 2" in system.out
    assert "restarting it in 2 s (restart 2 of at most 2" in system.out
    assert "  | ERROR fake engine: lost its device" in system.err
    assert leftovers(system.run_dir) == []


def test_engine_saying_it_cannot_serve_is_restarted_at_once(tmp_path, ports, fake_model, launched):
    """vLLM's /health answers 503 once its engine core died: no freeze deadline to wait for."""
    modes = {ports.decode: "sick"}
    system = launch_fake(tmp_path, ports, fake_model, "--max-restarts", "1", modes=modes)
    launched.append(system)
    system.wait_for(READY, 60)
    (tmp_path / TRIGGER).touch()
    # Restarted for what /health said, not for missing the 30 s freeze deadline.
    system.wait_for(
        f"decode engine said it cannot serve (GET http://127.0.0.1:{ports.decode}/health "
        "answered 503: its engine core is gone); restarting it in 1 s",
        60,
    )
    assert system.finish(timeout=60) == 1  # sick again after its restart: it gives up
    assert "after 1 restarts within 600 s; giving up, so everything stops" in system.err
    assert leftovers(system.run_dir) == []
