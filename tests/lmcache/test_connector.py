"""LMCache's own `lm://` remote connector (what an LMCache-enabled vLLM worker uses), our store."""

from __future__ import annotations

import threading

import psutil
import pytest
import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat

from splitwise_local.store import open_backend
from tests.store.helpers import store_process

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("shape", "dtype", "fmt"),
    [
        pytest.param((2, 8, 256, 128), torch.bfloat16, MemoryFormat.KV_2LTD, id="1MiB-KV_2LTD"),
        pytest.param((256, 2, 16384), torch.float16, MemoryFormat.KV_T2D, id="16MiB-KV_T2D"),
    ],
)
def test_put_then_get_returns_the_value_as_stored(
    make_server, lmcache_client, shape, dtype, fmt
) -> None:
    server = make_server(capacity=64 * MiB)
    client = lmcache_client(server.tcp_url)
    key = client.key(42)
    value = client.value(shape, dtype, fmt)
    assert not client.exists(key)
    client.put(key, value)
    assert client.exists(key)
    got = client.get(key)
    assert got is not None
    assert (got.get_shape(), got.get_dtype(), got.get_memory_format()) == (
        torch.Size(shape),
        dtype,
        fmt,
    )
    assert bytes(got.byte_array) == bytes(value.byte_array)
    client.free(got)


def test_a_missing_key_is_a_miss_not_an_error(server, lmcache_client) -> None:
    client = lmcache_client(server.tcp_url)
    assert client.get(client.key(404)) is None
    assert not client.exists(client.key(404))
    with open_backend(server.tcp_url) as ours:
        assert ours.stats()["misses"] == 1


def test_an_lmcache_value_is_our_clients_value_too(server, lmcache_client) -> None:
    """An LMCache key is stored under its own string: our client sees the same bytes, and a
    value our client stored reaches LMCache as its own kind of opaque byte buffer."""
    client = lmcache_client(server.tcp_url)
    key = client.key(7)
    value = client.value((2, 4, 32, 64))
    client.put(key, value)
    assert client.exists(key)  # PUT has no reply: this answer means it is stored
    for url in (server.tcp_url, server.shm_url):
        with open_backend(url) as ours:
            assert ours.exists([key.to_string()]) == 1
            assert bytes(ours.get(key.to_string())) == bytes(value.byte_array)

    plain = client.key(8)
    with open_backend(server.tcp_url) as ours:
        ours.put(plain.to_string(), b"stored by our own protocol")
    got = client.get(plain)
    assert got is not None
    assert got.get_memory_format() == MemoryFormat.BINARY_BUFFER
    assert bytes(got.byte_array) == b"stored by our own protocol"
    client.free(got)


def test_the_longest_lmcache_key_fits(server, lmcache_client) -> None:
    client = lmcache_client(server.tcp_url)
    short = CacheEngineKey("m", 1, 0, 1, torch.bfloat16).to_string()
    key = CacheEngineKey("m" * (151 - len(short)), 1, 0, 1, torch.bfloat16)
    assert len(key.to_string()) == 150
    value = client.value((2, 1, 16, 64))
    client.put(key, value)
    got = client.get(key)
    assert got is not None and bytes(got.byte_array) == bytes(value.byte_array)
    client.free(got)


def test_several_lmcache_clients_at_once(make_server, lmcache_client) -> None:
    server = make_server(capacity=64 * MiB)
    clients = [lmcache_client(server.tcp_url, pool_gb=0.02) for _ in range(4)]
    values = [client.value((2, 4, 64, 128)) for client in clients]  # 128 KiB each
    barrier = threading.Barrier(len(clients))
    errors: list[BaseException] = []

    def work(n: int) -> None:
        client = clients[n]
        try:
            for i in range(16):
                client.put(client.key(1000 * n + i), values[n])
            assert client.exists(client.key(1000 * n + 15))  # all 16 stored, for everyone
            barrier.wait(timeout=60)
            for other in range(len(clients)):  # everyone's values, over this connection
                for i in range(16):
                    got = client.get(client.key(1000 * other + i))
                    assert got is not None
                    assert bytes(got.byte_array) == bytes(values[other].byte_array)
                    client.free(got)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    with open_backend(server.tcp_url) as ours:
        stats = ours.stats()
    assert (stats["items"], stats["puts"], stats["hits"]) == (64, 64, 256)


def test_at_capacity_lmcache_values_are_evicted_and_rss_stays_flat(lmcache_client) -> None:
    cap_mb = 32
    with store_process("--max-size-gb", str(cap_mb / 1024)) as store:
        client = lmcache_client(store.tcp_url)
        value = client.value((2, 8, 256, 128))  # 1 MiB
        server = psutil.Process(store.process.pid)
        rss = []
        for round_ in range(4):
            for i in range(cap_mb):
                client.put(client.key(cap_mb * round_ + i), value)
            assert client.exists(client.key(cap_mb * round_ + cap_mb - 1))  # all stored
            rss.append(server.memory_info().rss)
        assert not client.exists(client.key(0))
        got = client.get(client.key(4 * cap_mb - 1))
        assert got is not None and bytes(got.byte_array) == bytes(value.byte_array)
        client.free(got)
        with open_backend(store.tcp_url) as ours:
            stats = ours.stats()
    assert stats["evictions"] >= 3 * cap_mb - 1
    assert stats["capacity"] == cap_mb * MiB
    assert max(rss) <= cap_mb * MiB * 1.1 + 100 * MiB
    assert rss[-1] - rss[0] < 8 * MiB, [r // MiB for r in rss]
