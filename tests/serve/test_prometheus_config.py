"""`serve --prometheus` with fake_vllm's engines (fast): a real Prometheus (Debian's), a scrape
config that lists the proxy, every engine the launcher started and the store, checked by
Prometheus's own promtool and read back from Prometheus's HTTP API."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import httpx
import pytest
import yaml

from tests.serve.helpers import (
    READY,
    Launch,
    Ports,
    fake_env,
    free_ports,
    launch_fake,
    leftovers,
)

pytestmark = pytest.mark.timeout(120)


def active_targets(prometheus: str) -> list[dict]:
    reply = httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()
    assert reply["status"] == "success"
    return reply["data"]["activeTargets"]


def wait_for_health(prometheus: str, wanted: dict[str, str], timeout: float = 30) -> dict:
    """scrape URL -> health, once every URL in `wanted` has the health wanted for it."""
    deadline = time.monotonic() + timeout
    while True:
        health = {t["scrapeUrl"]: t["health"] for t in active_targets(prometheus)}
        if all(health.get(url) == state for url, state in wanted.items()):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.5)


def test_the_scrape_config_lists_every_engine_the_launcher_started(tmp_path, fake_model, launched):
    ports = Ports.for_engines(2, 1)
    (prometheus_port,) = free_ports(1)
    system = launch_fake(
        tmp_path,
        ports,
        fake_model,
        *("--prefill", "2", "--decode", "1", "--prometheus"),
        *("--prometheus-port", str(prometheus_port), "--scrape-interval", "1"),
    )
    launched.append(system)
    system.wait_for(READY, 60)
    prometheus = f"http://127.0.0.1:{prometheus_port}"
    assert f"  prometheus: {prometheus} (Grafana dashboard: configs/grafana/splitwise.json)" in (
        system.out
    )

    config_file = system.run_dir / "prometheus.yml"
    check = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "config", str(config_file)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    jobs = {
        job["job_name"]: job["static_configs"]
        for job in yaml.safe_load(config_file.read_text())["scrape_configs"]
    }
    engines = sorted(
        (entry["labels"]["role"], entry["labels"]["component"], entry["targets"][0])
        for entry in jobs["engine"]
    )
    assert engines == [
        ("decode", "decode engine", f"127.0.0.1:{ports.decode}"),
        ("prefill", "prefill engine 0", f"127.0.0.1:{ports.prefill}"),
        ("prefill", "prefill engine 1", f"127.0.0.1:{ports.prefill + 1}"),
    ]
    assert [entry["targets"] for entry in jobs["proxy"]] == [[f"127.0.0.1:{ports.proxy}"]]
    assert [entry["targets"] for entry in jobs["store"]] == [[f"127.0.0.1:{ports.store_metrics}"]]

    # The proxy, the store and the fake engines (vLLM's request gauges) all serve /metrics.
    engine_urls = [f"http://{address}/metrics" for _, _, address in engines]
    health = wait_for_health(
        prometheus,
        {
            f"http://127.0.0.1:{ports.proxy}/metrics": "up",
            f"http://127.0.0.1:{ports.store_metrics}/metrics": "up",
            **dict.fromkeys(engine_urls, "up"),
        },
    )
    assert len(health) == 5

    assert system.finish(signal.SIGTERM) == 0
    out = system.out
    assert out.index("stopping store") < out.index("stopping prometheus")  # last out
    assert leftovers(system.run_dir) == []
    assert (system.run_dir / "prometheus" / "wal").is_dir()  # the run's series stay with it


def test_a_missing_prometheus_is_one_line_and_starts_nothing(tmp_path, ports, fake_model, launched):
    env = fake_env(tmp_path, ports)
    env["PATH"] = str(tmp_path / "empty-bin")  # no prometheus there
    args = ["--device", "cpu", "--model", str(fake_model), *ports.args(), "--prometheus"]
    system = Launch(args, tmp_path / "run", env)
    launched.append(system)
    assert system.finish(timeout=30) == 1
    assert system.err.strip().splitlines() == [
        "[launcher] error: `prometheus` is not installed (Debian's prometheus package): "
        "run `bash scripts/setup.sh --with-prometheus`"
    ]
    assert "starting" not in system.out
