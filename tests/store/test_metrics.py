"""The store's /metrics page: Prometheus's text format, read back with prometheus-client's own
parser, every number matching what the clients did."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from splitwise_local.store import StoreFull, open_backend
from tests.serve.helpers import free_ports
from tests.store.helpers import unique_name

PAGE = 4096


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on the page, by (name, sorted labels)."""
    reply = httpx.get(url, timeout=10)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def ours(samples: dict, name: str) -> float:
    return samples[(f"splitwise_store_{name}", (("protocol", "splitwise"),))]


@pytest.fixture
def small(make_server):
    """Eight one-page slots; /metrics on a free port."""
    return make_server(capacity=8 * PAGE, page_size=PAGE, metrics_port=0)


def test_metrics_count_what_the_clients_did(small):
    assert small.metrics is not None and small.metrics.host == "127.0.0.1"
    with open_backend(small.tcp_url) as tcp, open_backend(small.shm_url) as shm:
        for i in range(10):  # two more than fit: two evictions
            tcp.put(f"k{i}", bytes([i]) * PAGE)
        assert shm.get("k9") is not None and shm.get("k0") is None  # one hit, one miss
        assert tcp.exists(["k8", "k9", "gone"]) == 2  # a lookup that stops at a missing key
        samples = scrape(small.metrics.url)
        assert ours(samples, "connections") == 2  # both clients still connected
    assert ours(samples, "puts_total") == 10
    assert ours(samples, "written_bytes_total") == 10 * PAGE
    assert ours(samples, "evictions_total") == 2
    assert ours(samples, "items") == 8
    assert ours(samples, "held_bytes") == 8 * PAGE
    assert ours(samples, "hits_total") == 1 and ours(samples, "misses_total") == 1
    assert ours(samples, "read_bytes_total") == PAGE
    assert ours(samples, "lookup_hits_total") == 2 and ours(samples, "lookup_misses_total") == 1
    assert ours(samples, "rejected_puts_total") == 0
    assert ours(samples, "connections_accepted_total") == 2
    assert samples[("splitwise_store_capacity_bytes", ())] == 8 * PAGE
    assert samples[("splitwise_store_used_bytes", ())] == 8 * PAGE
    lmcache = (("protocol", "lmcache"),)
    assert samples[("splitwise_store_puts_total", lmcache)] == 0  # present, at zero
    assert samples[("splitwise_store_items", lmcache)] == 0


def test_connections_past_the_caps_are_counted(make_server):
    server = make_server(auth_token="t", max_unauthenticated=1, metrics_port=0)
    stranger = socket.create_connection(("127.0.0.1", server.port))
    busy = socket.create_connection(("127.0.0.1", server.port))
    assert busy.recv(5)[:4] == b"SWKV"  # the BUSY answer
    samples = scrape(server.metrics.url)
    assert samples[("splitwise_store_connections_unauthenticated", ())] == 1
    assert samples[("splitwise_store_connections_refused_total", ())] == 1
    for sock in (stranger, busy):
        sock.close()


def test_a_full_store_counts_a_rejected_put(make_server):
    """Everything pinned by a reader: the put is refused, and counted as rejected."""
    server = make_server(capacity=PAGE, page_size=PAGE, metrics_port=0)
    with open_backend(server.tcp_url) as tcp:
        tcp.put("only", b"a" * PAGE)
        (held,) = server.index.acquire([b"only"])
        try:
            with pytest.raises(StoreFull):
                tcp.put("other", b"b" * PAGE)
        finally:
            server.index.release([held])
    samples = scrape(server.metrics.url)
    assert ours(samples, "rejected_puts_total") == 1
    assert ours(samples, "evictions_total") == 0


def test_the_store_command_serves_metrics_on_its_own_port():
    port, metrics_port = free_ports(2)
    command = [sys.executable, "-m", "splitwise_local", "store", "--port", str(port)]
    command += ["--shm-name", unique_name("m"), "--max-size-gb", "0.015625"]
    command += ["--metrics-port", str(metrics_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith(f"store ready on lm://127.0.0.1:{port} ")
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert process.stdout.readline().strip() == f"store metrics on {url}"
        with open_backend(f"lm://127.0.0.1:{port}") as tcp:
            tcp.put("k", b"v" * 100)
        samples = scrape(url)
        assert ours(samples, "puts_total") == 1 and ours(samples, "held_bytes") == 100
        assert samples[("splitwise_store_capacity_bytes", ())] == 16 * 1024**2
    finally:
        process.terminate()
        assert process.wait(10) == 0


def test_a_busy_metrics_port_is_one_line_and_exit_1():
    port, metrics_port = free_ports(2)
    with socket.create_server(("127.0.0.1", metrics_port)):
        command = [sys.executable, "-m", "splitwise_local", "store", "--port", str(port)]
        command += ["--shm-name", unique_name("m"), "--max-size-gb", "0.015625"]
        command += ["--metrics-port", str(metrics_port)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"store: cannot serve /metrics on 127.0.0.1:{metrics_port}: Address already in use"
    )
