"""End to end on real vLLM CPU engines: `python -m splitwise_local` as a user starts it.

One launch per topology serves every test of this module (engines take a minute or more to
start on two cores): one prefill and two decode engines under the default `--disagg auto`, then
two prefill and one decode under `--disagg always` (three engines on two cores: the doubled
role shares its core). Each runs the sample requests whole and streamed, sends the long
prompt's KV through the store, checks that both engines of the doubled role got requests and
that the routing decisions follow the policy, looks at the run folder, and, last, kills a decode
engine, which under
`--restart never` must bring the whole system down with a non-zero exit and nothing left running
(restarts: tests/chaos/).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from splitwise_local.config import load_config
from splitwise_local.samples import SAMPLES, ask, chat_request, served_model
from splitwise_testing.launch import open_store
from splitwise_testing.scrape import total
from tests.proxy.routes import route_of, routes_counted
from tests.serve.helpers import Launch, Ports, leftovers, sweep

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
STARTUP_TIMEOUT_S = 900
LONG = next(sample for sample in SAMPLES if sample.name == "long")
# Under auto the repeated samples skip prefill (short, or stored), so the two-prefill topology
# runs `always`: every request then passes a prefill engine, and affinity spreads the two
# samples over both.
TOPOLOGIES = [(1, 2, "auto"), (2, 1, "always")]


@dataclass
class Running:
    launch: Launch
    ports: Ports
    counts: dict[str, int]
    disagg: str
    url: str
    model: str

    def engine_ports(self, role: str) -> list[int]:
        first = self.ports.prefill if role == "prefill" else self.ports.decode
        return [first + index for index in range(self.counts[role])]

    def log_names(self, role: str) -> list[str]:
        count = self.counts[role]
        return [f"{role}.log"] if count == 1 else [f"{role}-{i}.log" for i in range(count)]

    def metric(self, role: str, name: str) -> float:
        """Sum of a Prometheus counter over its label sets and over the role's engines."""
        return sum(self.metric_of(port, name) for port in self.engine_ports(role))

    @staticmethod
    def metric_of(port: int, name: str) -> float:
        """Sum of a Prometheus counter over its label sets, read from one engine."""
        return total(f"http://127.0.0.1:{port}", name)


@pytest.fixture(scope="module", params=TOPOLOGIES, ids=lambda t: f"{t[0]}P{t[1]}D-{t[2]}")
def system(request, tmp_path_factory) -> Iterator[Running]:
    prefill, decode, disagg = request.param
    root = tmp_path_factory.mktemp(f"launcher-{prefill}p{decode}d")
    ports = Ports.for_engines(prefill, decode)
    counts = ["--prefill", str(prefill), "--decode", str(decode), "--disagg", disagg]
    detail = ["--route-detail"]  # the route header these tests read
    launch = Launch([*ports.args(), *counts, *detail, "--restart", "never"], root / "run")
    try:
        launch.wait_for("ready: http://", STARTUP_TIMEOUT_S)
        url = f"http://127.0.0.1:{ports.proxy}"
        with httpx.Client(timeout=30) as client:
            model = served_model(client, url)
        counted = {"prefill": prefill, "decode": decode}
        yield Running(launch, ports, counted, disagg, url, model)
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
    config = load_config(system.launch.run_dir / "splitwise.yaml")
    store = open_store(system.launch.run_dir)
    items_before = store.stats()["items"]
    hits = "vllm:external_prefix_cache_hits_total"
    hits_before = system.metric("decode", hits)
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
    assert system.metric("decode", hits) - hits_before == prompt_tokens - 1
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


def test_every_engine_received_requests(system):
    """After the samples: the proxy spread them over both engines of the doubled role."""
    for role in ("prefill", "decode"):
        for port in system.engine_ports(role):
            engine = f"http://127.0.0.1:{port}"
            sent = total(system.url, "splitwise_proxy_engine_requests_total", engine=engine)
            assert sent >= 1, (role, port)
    # And by each engine's own count, it finished requests.
    for role in ("prefill", "decode"):
        for port in system.engine_ports(role):
            assert system.metric_of(port, "vllm:request_success_total") >= 1, (role, port)


def test_routes_follow_the_policy(system, client):
    """After the samples: what the header and /metrics say of the last two decisions."""
    decisions, routes = {}, {}
    for sample in SAMPLES:
        reply = client.post(
            f"{system.url}/v1/chat/completions", json=chat_request(system.model, sample)
        )
        reply.raise_for_status()
        routes[sample.name] = route = route_of(reply)
        decisions[sample.name] = (route["path"], route["reason"], route["policy"])
    if system.disagg == "auto":
        # Both are in the store by now: the long one from its prefill, the short one from the
        # decode engine that computed it (a kv_both engine saves what it computes).
        expected = ("direct", "stored_prefix", "auto")
        assert decisions == {"short": expected, "long": expected}
        for route in routes.values():
            assert route["stored_tokens"] == route["prompt_tokens"]
        assert routes_counted(system.url, "auto", "direct", "short_prompt") >= 1
        assert routes_counted(system.url, "auto", "disaggregated", "long_uncached") == 1
        assert routes_counted(system.url, "auto", "direct", "stored_prefix") >= 3
    else:
        expected = ("disaggregated", "always", "always")
        assert decisions == {"short": expected, "long": expected}
        assert routes_counted(system.url, "always", "disaggregated", "always") >= 7


def test_run_folder_holds_every_log_and_the_config(system):
    run_dir = system.launch.run_dir
    logs = ["store.log", "proxy.log", *system.log_names("prefill"), *system.log_names("decode")]
    for name in logs:
        assert (run_dir / name).stat().st_size > 0, name
    written = yaml.safe_load((run_dir / "splitwise.yaml").read_text())
    assert written["remote_url"].startswith("shm://")
    assert "POST /v1/chat/completions" in (run_dir / "proxy.log").read_text()


def test_killing_a_decode_engine_stops_everything(system):
    """Last of the module: it ends the shared system."""
    port = system.engine_ports("decode")[0]
    name = "decode engine" if system.counts["decode"] == 1 else "decode engine 0"
    system.launch.child(f"--port {port} ").send_signal(signal.SIGKILL)
    assert system.launch.popen.wait(180) == 1
    out = system.launch.out
    assert f"{name} was killed by signal 9 while serving" in system.launch.err
    stopping_engines = next(line for line in out.splitlines() if "stopping prefill engine" in line)
    assert out.index(stopping_engines) < out.index("stopping store")
    assert leftovers(system.launch.run_dir) == []
