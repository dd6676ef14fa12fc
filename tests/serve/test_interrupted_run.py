"""A test run that is stopped midway (Ctrl-C, SIGTERM, kill -9) leaves no engine or store.

The run under test is a pytest process whose session fixture starts a store and two engines
with `bench.engines.start_system`, the path of the real-engine fixtures, or the whole system
with the launcher (`bench.launched`, the path of the launcher and chaos tests); its engines are
fake_vllm's, which start in a second and leave helper processes of their own behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from splitwise_local.serve.process import alive, tagged
from tests.serve.helpers import FAKE_VLLM

pytestmark = pytest.mark.timeout(180)
GONE_WITHIN_S = 60.0  # a hang guard: the guardian kills what is left after its 5 s grace
REPO = str(Path(__file__).resolve().parents[2])

INNER_TEST = """
import os
import time
from pathlib import Path

import pytest

from splitwise_testing.system import start_system
from splitwise_local.config import SplitwiseConfig


@pytest.fixture(scope="session")
def system():
    roles = {"prefill": "prefill", "decode": "decode"}
    model = Path(os.environ["FAKE_MODEL"])
    system = start_system(Path(os.environ["RUN_ROOT"]), model, SplitwiseConfig(), roles)
    yield system
    system.stop()


def test_waits_to_be_stopped(system):
    Path(os.environ["READY_FILE"]).write_text("ready")
    time.sleep(600)
"""

INNER_LAUNCH = INNER_TEST.replace(
    """    roles = {"prefill": "prefill", "decode": "decode"}
    model = Path(os.environ["FAKE_MODEL"])
    system = start_system(Path(os.environ["RUN_ROOT"]), model, SplitwiseConfig(), roles)
    yield system
    system.stop()""",
    """    from tests.serve.helpers import Ports, free_ports, launch_fake

    root = Path(os.environ["RUN_ROOT"]).parent  # launch_fake runs in root / "run"
    system = launch_fake(root, Ports(*free_ports(5)), Path(os.environ["FAKE_MODEL"]))
    system.wait_for("ready: http://", 120)
    yield system
    system.stop()""",
)


def _sigint_at_its_default() -> None:
    """As from a terminal: a background job (CI) starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_test_run_leaves_no_engine_or_store(tmp_path, fake_model, sig):
    stop_midway(tmp_path, fake_model, INNER_TEST, sig)


def test_a_killed_test_run_leaves_no_launched_system(tmp_path, fake_model):
    """The launcher dies with the test run that started it, and its children with it."""
    stop_midway(tmp_path, fake_model, INNER_LAUNCH, signal.SIGKILL)


def stop_midway(tmp_path, fake_model, inner_test: str, sig: int) -> None:
    """Runs `inner_test` until its system is up, sends `sig`, and checks nothing is left."""
    (tmp_path / "test_inner.py").write_text(inner_test)
    run_root, ready = tmp_path / "run", tmp_path / "ready"
    env = dict(os.environ, RUN_ROOT=str(run_root), READY_FILE=str(ready))
    env.update(FAKE_MODEL=str(fake_model), PYTHONPATH=os.pathsep.join([str(FAKE_VLLM), REPO]))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"]
    inner = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_sigint_at_its_default,
    )
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert inner.poll() is None and time.monotonic() < deadline, inner.stdout.read()
            time.sleep(0.2)
        processes = psutil.Process(inner.pid).children(recursive=True)
        names = {" ".join(p.cmdline()) for p in processes}
        assert any("splitwise_local store" in name for name in names), names
        assert sum("vllm.entrypoints.openai.api_server" in name for name in names) == 2, names
        inner.send_signal(sig)
        output = inner.communicate(timeout=120)[0].decode(errors="replace")
        deadline = time.monotonic() + GONE_WITHIN_S
        while alive(processes) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [f"{p.pid} {' '.join(p.cmdline())}" for p in alive(processes)]
        assert left == [], output
        assert tagged(str(run_root)) == []
        if sig == signal.SIGINT:  # the fixture's teardown ran, and ran cleanly
            assert "stopping prefill, decode" in output, output
            assert "Traceback" not in output and "I/O operation" not in output, output
    finally:
        inner.kill()
        inner.wait()
        for process in [*alive(processes), *tagged(str(run_root))]:  # the launcher is untagged
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
