"""scripts/demo.sh: starts a system when none answers (and stops it), else uses the running one.

The engines are fake_vllm's, so this runs in seconds; the real engines' answers to the same
samples are checked in test_launcher_engine.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from splitwise_testing.fake_engine import FakeBehaviour
from tests.serve.helpers import Launch, fake_env, leftovers, sweep

pytestmark = pytest.mark.timeout(120)
DEMO = Path(__file__).resolve().parents[2] / "scripts" / "demo.sh"


FAKE_TOKEN = FakeBehaviour().name + "0"  # the fake engine's first answer token


def run_demo(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**env, "SPLITWISE_PYTHON": sys.executable}  # the interpreter running these tests
    return subprocess.run(
        ["bash", str(DEMO), *args], env=env, capture_output=True, text=True, timeout=100
    )


def test_demo_starts_a_system_sends_both_samples_and_stops_it(tmp_path, ports, fake_model):
    env = fake_env(tmp_path, ports)
    env["SPLITWISE_URL"] = f"http://127.0.0.1:{ports.proxy}"
    env["SPLITWISE_DEMO_LOG"] = str(tmp_path / "demo.log")
    run_dir = tmp_path / "run"
    launcher_args = ["--device", "cpu", "--model", str(fake_model), "--run-dir", str(run_dir)]
    launcher_args += ports.args()[2:]  # the demo sets --port from SPLITWISE_URL
    try:
        result = run_demo(env, *launcher_args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "starting one" in result.stdout
        assert ">>> short prompt" in result.stdout and ">>> long prompt" in result.stdout
        assert result.stdout.count(FAKE_TOKEN) == 2
        assert "stopping the system it started" in result.stdout
        assert leftovers(run_dir) == []
    finally:
        sweep(run_dir)


def test_demo_uses_a_running_system_and_leaves_it_running(tmp_path, ports, fake_model):
    system = Launch(
        ["--device", "cpu", "--model", str(fake_model), *ports.args()],
        tmp_path / "run",
        fake_env(tmp_path, ports),
    )
    try:
        system.wait_for("ready: http://", 60)
        env = {**fake_env(tmp_path, ports), "SPLITWISE_URL": f"http://127.0.0.1:{ports.proxy}"}
        env["SPLITWISE_STREAM"] = "1"
        result = run_demo(env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "using the system already running" in result.stdout
        assert result.stdout.count(FAKE_TOKEN) == 2
        assert system.popen.poll() is None
    finally:
        system.stop()
        sweep(system.run_dir)
