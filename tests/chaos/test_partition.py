"""A network partition between the engines and the store, on real engines.

The store runs in a Linux network namespace of its own (tests/netns.py), reached over a veth
link at `lm://10.x.y.2:port`; the engines and the proxy stay in the root namespace. With the
link down for longer than the store client's deadlines, requests keep being answered (the
engines compute the prompt themselves) and none hangs; once the link is back, the decode engine
loads KV from the store again (external hits resume) without a restart of anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from splitwise_bench.chaos import prompts
from splitwise_local.config import SplitwiseConfig
from splitwise_local.models.checkpoint import prepare_default_model
from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.serve.process import RUN_ENV, terminate
from splitwise_testing.scrape import total
from splitwise_testing.system import System, start_system
from tests.netns import Host, Network, netns_problem
from tests.proxy.servers import Servers

pytestmark = [
    pytest.mark.engine,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(netns_problem() is not None, reason=str(netns_problem())),
]
STORE_PORT = 10080  # the store's own namespace: no port of this host can clash
PARTITION_S = 45.0  # longer than the store client's 30 s socket deadlines
REQUEST_TIMEOUT_S = 120.0  # "hangs" means: no answer within this
HITS = "vllm:external_prefix_cache_hits_total"


@dataclass
class Partitioned:
    host: Host
    system: System
    url: str

    def hits(self) -> float:
        return total(self.system.engines["decode"].url, HITS)


@pytest.fixture(scope="module")
def partitioned(tmp_path_factory) -> Iterator[Partitioned]:
    root = tmp_path_factory.mktemp("partition")
    with Network() as net:
        host = net.add("store")
        command = [sys.executable, "-m", "splitwise_local", "store", "--host", host.address]
        command += ["--port", str(STORE_PORT), "--max-size-gb", "1"]
        with (root / "store.log").open("wb") as log:
            store = subprocess.Popen(
                host.command(command),
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, RUN_ENV: str(root)},
            )
        servers = Servers()
        system = None
        try:
            config = SplitwiseConfig(remote_url=f"lm://{host.address}:{STORE_PORT}")
            roles = {"prefill": "prefill", "decode": "decode"}
            system = start_system(root, prepare_default_model(), config, roles, transport="remote")
            engines = system.engines
            settings = ProxySettings(
                prefill=[engines["prefill"].url], decode=[engines["decode"].url]
            )
            yield Partitioned(host, system, servers.serve(build_app(settings)))
        finally:
            servers.stop()
            if system is not None:
                system.stop()
            terminate(store)


def ask(client: httpx.Client, partitioned: Partitioned, prompt: str) -> tuple[str, float]:
    """A completion through the proxy, and how long it took."""
    body = {"model": partitioned.system.engines["decode"].model, "prompt": prompt}
    began = time.monotonic()
    answer = client.post(
        partitioned.url + "/v1/completions",
        json={**body, "max_tokens": 8, "temperature": 0},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert answer.status_code == 200, answer.text
    text = answer.json()["choices"][0]["text"]
    assert text.strip(), answer.text
    return text, time.monotonic() - began


def test_requests_are_answered_through_a_partition_and_hits_resume_after(partitioned):
    texts = iter(prompts(60, words=300))
    with httpx.Client() as client:
        hits = partitioned.hits()
        ask(client, partitioned, next(texts))
        assert partitioned.hits() > hits, "no KV came through the store before the partition"

        partitioned.host.cut()
        cut_at = time.monotonic()
        during: list[float] = []  # requests sent and answered while the link was down
        hits = partitioned.hits()
        try:
            while time.monotonic() - cut_at < PARTITION_S:
                _, took = ask(client, partitioned, next(texts))
                if time.monotonic() - cut_at < PARTITION_S:
                    during.append(took)
        finally:
            partitioned.host.mend()
        print(f"answered during the {PARTITION_S:.0f} s partition: {len(during)}, seconds {during}")
        assert len(during) >= 2, "requests waited for the store instead of computing"
        assert partitioned.hits() == hits  # computed, not loaded: the store was out of reach

        mended_at = time.monotonic()
        resumed = None
        while time.monotonic() - mended_at < 120:
            ask(client, partitioned, next(texts))
            if partitioned.hits() > hits:
                resumed = time.monotonic() - mended_at
                break
        print(f"external hits resumed {resumed} s after the link came back")
        assert resumed is not None, "the decode engine never loaded from the store again"
