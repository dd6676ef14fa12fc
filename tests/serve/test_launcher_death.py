"""kill -9 of the launcher while it serves with real vLLM engines: within 10 s nothing of it is
left (API servers, their renamed engine cores and workers, the store) and every port is free,
and the next start on the same ports serves."""

from __future__ import annotations

import signal
import time

import httpx
import psutil
import pytest

from splitwise_local.samples import SAMPLES, ask, chat_request
from splitwise_local.serve.ports import bind_problem
from splitwise_local.serve.process import alive
from splitwise_testing.launch import Launch, launch_system, leftovers, sweep

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
GONE_WITHIN_S = 60.0  # a hang guard: the guardian kills what is left after its 5 s grace
OPTIONS = {
    "proxy": "--port",
    "prefill engine": "--prefill-port",
    "decode engine": "--decode-port",
    "store": "--store-port",
    "store metrics": "--store-metrics-port",
}


def busy(ports: dict[str, int]) -> list[str]:
    return [name for name, port in ports.items() if bind_problem("127.0.0.1", port) is not None]


def test_kill_9_of_the_launcher_with_real_engines_leaves_nothing(tmp_path):
    running = launch_system(tmp_path / "run", health_deadline_s=30)
    again = None
    try:
        processes = psutil.Process(running.launch.popen.pid).children(recursive=True)
        names = [process.name() for process in processes]
        assert names.count("VLLM::EngineCore") == 2, names
        running.launch.finish(signal.SIGKILL)
        killed = time.monotonic()
        deadline = killed + GONE_WITHIN_S
        while (alive(processes) or busy(running.ports)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [f"{p.pid} {p.name()}" for p in alive(processes)]
        assert left == [] and busy(running.ports) == [], running.launch.err
        print(f"all {len(processes)} gone {time.monotonic() - killed:.1f} s after kill -9")
        while "[guardian]" not in running.launch.err and time.monotonic() < deadline:
            time.sleep(0.1)  # it says what it found once that is gone, or killed
        print(*[line for line in running.launch.err.splitlines() if "[guardian]" in line])

        args = [str(a) for name, port in running.ports.items() for a in (OPTIONS[name], port)]
        again = Launch([*args, "--health-deadline", "30"], tmp_path / "again")
        again.wait_for("ready: http://", 900)
        with httpx.Client(timeout=300) as client:
            assert ask(client, running.url, chat_request(running.model, SAMPLES[0])).strip()
        assert again.finish(signal.SIGTERM, timeout=120) == 0
        assert leftovers(again.run_dir) == []
    finally:
        for launch in filter(None, (running.launch, again)):
            launch.stop()
            sweep(launch.run_dir)
