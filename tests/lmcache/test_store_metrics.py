"""The store's /metrics split by protocol: LMCache's own connector and our client on one store,
each protocol's puts, hits, misses, bytes and connections counted apart."""

from __future__ import annotations

from splitwise_local.store import open_backend
from tests.store.test_metrics import scrape

MiB = 1024 * 1024


def test_each_protocol_is_counted_apart(make_server, lmcache_client) -> None:
    server = make_server(capacity=16 * MiB, metrics_port=0)
    client = lmcache_client(server.tcp_url)
    stored = [client.value((2, 4, 32, 64)) for _ in range(2)]
    for chunk, value in enumerate(stored):
        client.put(client.key(chunk), value)
    got = client.get(client.key(0))
    assert got is not None
    client.free(got)
    assert client.get(client.key(404)) is None
    assert client.exists(client.key(1)) and not client.exists(client.key(405))
    with open_backend(server.tcp_url) as ours:
        ours.put("ours", b"o" * 1000)
        assert ours.get("ours") is not None
        samples = scrape(server.metrics.url)

    def value(name: str, protocol: str) -> float:
        return samples[(f"splitwise_store_{name}", (("protocol", protocol),))]

    lmcache_bytes = sum(len(memoryview(v.byte_array).cast("B")) for v in stored)
    assert value("puts_total", "lmcache") == 2 and value("puts_total", "splitwise") == 1
    assert value("items", "lmcache") == 2 and value("items", "splitwise") == 1
    assert value("held_bytes", "lmcache") == lmcache_bytes
    assert value("held_bytes", "splitwise") == 1000
    assert value("hits_total", "lmcache") == 1 and value("misses_total", "lmcache") == 1
    assert value("hits_total", "splitwise") == 1 and value("misses_total", "splitwise") == 0
    assert value("lookup_hits_total", "lmcache") == 1
    assert value("lookup_misses_total", "lmcache") == 1
    assert value("read_bytes_total", "lmcache") == lmcache_bytes // 2
    assert value("connections", "lmcache") >= 1  # LMCache's connector keeps its connection
    assert value("connections", "splitwise") == 1
    assert value("connections_accepted_total", "splitwise") == 1
