"""KV cost probes against a real KV store process: bytes put show up per request."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from splitwise_bench import kv_cost
from splitwise_local.store.backend import open_backend


@pytest.fixture
def store_url():
    name = f"bench-test-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "splitwise_local", "store", "--port", "0",
           "--max-size-gb", "0.01", "--shm-name", name]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("store ready on lm://"), line
        yield line.split()[3]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_store_growth_is_reported_per_request(store_url):
    before = kv_cost.snapshot(store_url, [])
    client = open_backend(store_url)
    try:
        client.put_many([(f"{i:064x}", bytes(1000 * (i + 1))) for i in range(3)])
        assert client.get(f"{0:064x}") is not None
    finally:
        client.close()
    after = kv_cost.snapshot(store_url, [])
    cost = kv_cost.compare(before, after, requests=2)
    assert cost["kv_bytes_per_request"] == 6000 / 2
    assert cost["kv_bytes_exact"] is True
    assert cost["store"]["delta"]["items"] == 3
    assert cost["store"]["per_request"]["hits"] == 0.5


def test_an_unreachable_store_is_a_finding_not_a_crash():
    cost = kv_cost.compare(*(kv_cost.snapshot("lm://127.0.0.1:9", []) for _ in range(2)), 4)
    assert "error" in cost["store"] and "kv_bytes_per_request" not in cost
