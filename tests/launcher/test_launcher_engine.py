"""End to end on real vLLM CPU engines: `python -m splitwise_local` as a user starts it.

One launch serves every test of this module (engines take a minute or more to start on two
cores): the sample requests whole and streamed, the long prompt's KV through the store, the
run folder, and, last, killing the decode engine, which must bring the whole system down with a
non-zero exit and nothing left running.
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from splitwise_local.samples import SAMPLES, ask, chat_request, served_model
from tests.launcher.helpers import Launch, Ports, free_ports, leftovers, sweep

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
STARTUP_TIMEOUT_S = 900
LONG = next(sample for sample in SAMPLES if sample.name == "long")


@dataclass
class Running:
    launch: Launch
    ports: Ports
    url: str
    model: str

    def metric(self, port: int, name: str) -> float:
        """Sum of a Prometheus counter over its label sets, read from an engine."""
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("launcher-e2e")
    ports = Ports(*free_ports(4))
    launch = Launch(ports.args(), root / "run")
    try:
        launch.wait_for("ready: http://", STARTUP_TIMEOUT_S)
        url = f"http://127.0.0.1:{ports.proxy}"
        with httpx.Client(timeout=30) as client:
            yield Running(launch, ports, url, served_model(client, url))
        launch.stop()
        assert leftovers(launch.run_dir) == []
    finally:
        launch.stop()
        sweep(launch.run_dir)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=600) as client:
        yield client


def test_long_prompt_kv_goes_through_the_store(system, client):
    """First of the module: no engine has seen the long prompt yet."""
    from splitwise_local.config import load_config
    from splitwise_local.store.backend import open_backend

    config = load_config(system.launch.run_dir / "splitwise.yaml")
    store = open_backend(config.remote_url, config)
    items_before = store.stats()["items"]
    hits = "vllm:external_prefix_cache_hits_total"
    hits_before = system.metric(system.ports.decode, hits)
    reply = client.post(f"{system.url}/v1/chat/completions", json=chat_request(system.model, LONG))
    reply.raise_for_status()
    answer = reply.json()
    prompt_tokens = answer["usage"]["prompt_tokens"]
    assert prompt_tokens > 1000
    text = answer["choices"][0]["message"]["content"]
    assert "earthquake" in text.lower() or "1906" in text, text
    chunks = math.ceil(prompt_tokens / config.chunk_size)
    assert store.stats()["items"] - items_before >= chunks
    # The decode engine computed only the last prompt token itself.
    assert system.metric(system.ports.decode, hits) - hits_before == prompt_tokens - 1
    store.close()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("sample", SAMPLES, ids=[sample.name for sample in SAMPLES])
def test_sample_requests_get_sensible_answers(system, client, sample, stream):
    text = ask(client, system.url, chat_request(system.model, sample, stream))
    words = text.split()
    assert len(words) >= 5, text
    assert sum(word.isalpha() for word in words) >= len(words) // 2, text
    if sample.name == "short":
        assert "san francisco" in text.lower(), text


def test_run_folder_holds_every_log_and_the_config(system):
    run_dir = system.launch.run_dir
    for name in ("store.log", "prefill.log", "decode.log", "proxy.log"):
        assert (run_dir / name).stat().st_size > 0, name
    written = yaml.safe_load((run_dir / "splitwise.yaml").read_text())
    assert written["remote_url"].startswith("shm://")
    assert "POST /v1/chat/completions" in (run_dir / "proxy.log").read_text()


def test_killing_the_decode_engine_stops_everything(system):
    """Last of the module: it ends the shared system."""
    decode = system.launch.child(f"--port {system.ports.decode}")
    decode.send_signal(signal.SIGKILL)
    assert system.launch.popen.wait(180) == 1
    out = system.launch.out
    assert "decode engine was killed by signal 9 while serving" in system.launch.err
    assert "stopping prefill engine, decode engine" in out
    assert out.index("stopping prefill engine, decode engine") < out.index("stopping store")
    assert leftovers(system.launch.run_dir) == []
