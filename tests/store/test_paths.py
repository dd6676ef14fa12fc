"""Both data paths against a live server: what one client puts, every other reads."""

from __future__ import annotations

import asyncio
import os

import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_local.store import StoreUnavailable, ValueTooLarge, open_backend
from splitwise_local.store.aio import AsyncStoreClient
from splitwise_local.store.backend import BACKENDS
from splitwise_local.store.client import ShmClient, StoreClient
from tests.store.helpers import make_value

MiB = 1024 * 1024


@pytest.fixture
def clients(server):
    tcp, shm = open_backend(server.tcp_url), open_backend(server.shm_url)
    yield tcp, shm
    tcp.close()
    shm.close()


def test_urls_choose_the_client(server, clients):
    tcp, shm = clients
    assert type(tcp) is StoreClient and type(shm) is ShmClient
    assert server.tcp_url.startswith("lm://127.0.0.1:")
    assert server.shm_url == f"shm://{server.shm_name}"


@pytest.mark.parametrize("size", [0, 1, 4096, 65536 + 1, 3 * MiB + 17])
def test_round_trip_on_each_path_and_across(clients, size):
    tcp, shm = clients
    for writer, reader in [(tcp, tcp), (shm, shm), (tcp, shm), (shm, tcp)]:
        value = os.urandom(size)
        writer.put("k", value)
        assert bytes(reader.get("k")) == value


def test_value_put_over_tcp_is_read_through_shared_memory_and_back(clients):
    tcp, shm = clients
    value = make_value("there", 2 * MiB)
    tcp.put("a" * 64, value)
    through_shm = bytes(shm.get("a" * 64))
    assert through_shm == value
    shm.put("b" * 64, through_shm)
    assert bytes(tcp.get("b" * 64)) == value


def test_batched_operations_keep_order_and_report_misses(clients):
    tcp, shm = clients
    items = [(f"{i:064x}", make_value(str(i), 1000 * i)) for i in range(1, 40)]
    shm.put_many(items[:20])
    tcp.put_many(items[20:])
    keys = [key for key, _ in items]
    for client in clients:
        got = client.get_many([*keys, "missing"])
        assert [bytes(v) for v in got[:-1]] == [v for _, v in items] and got[-1] is None
        assert client.exists(keys) == len(keys)
        assert client.exists([*keys[:5], "missing", *keys[5:]]) == 5
        assert client.exists([]) == 0 and client.get_many([]) == []


def test_large_shared_memory_batch_is_split_to_fit(make_server):
    server = make_server(capacity=4 * MiB)
    with ShmClient(server.shm_name) as shm:
        items = [(str(i), make_value(str(i), 512 * 1024)) for i in range(6)]  # 3 MiB, > cap/4
        shm.put_many(items)
        assert [bytes(v) for v in shm.get_many([k for k, _ in items])] == [v for _, v in items]


def test_delete_stats_and_str_or_bytes_keys(clients):
    tcp, shm = clients
    tcp.put(b"raw", b"1")
    assert bytes(shm.get("raw")) == b"1"
    assert shm.delete("raw") and not tcp.delete("raw")
    assert tcp.get("raw") is None
    stats = shm.stats()
    for key in ("items", "bytes", "capacity", "hits", "misses", "evictions", "pinned", "pending"):
        assert isinstance(stats[key], int), key
    assert stats["misses"] >= 1 and stats["hits"] >= 1 and stats["pending"] == 0


def test_oversized_value_is_refused_by_both_clients_before_sending(make_server):
    server = make_server(capacity=4 * MiB, max_value=MiB)
    for url in (server.tcp_url, server.shm_url):
        with open_backend(url) as client:
            client.put("ok", b"x" * MiB)
            with pytest.raises(ValueTooLarge):
                client.put("big", b"x" * (MiB + 1))
            with pytest.raises(ValueTooLarge):
                client.put_many([("fine", b"x"), ("big", b"x" * (MiB + 1))])
            assert client.get("big") is None and client.get("fine") is None
            assert client.stats()["items"] == 1


def test_client_recovers_when_the_server_restarts(make_server):
    first = make_server()
    port, name = first.port, first.shm_name
    tcp, shm = open_backend(first.tcp_url), open_backend(first.shm_url)
    shm.put("a", b"old")
    first.stop()
    with pytest.raises(StoreUnavailable):
        tcp.get("a")
    second = make_server(port=port, shm_name=name)
    assert second.port == port
    shm.put("b", b"x" * 200_000)  # goes through the new server's arena
    assert tcp.get("a") is None and bytes(tcp.get("b")) == b"x" * 200_000
    tcp.close()
    shm.close()


def test_unreachable_store_is_store_unavailable():
    for url in ("lm://127.0.0.1:1", "shm://nobody-serves-this"):
        with open_backend(url) as client, pytest.raises(StoreUnavailable):
            client.stats()


def test_open_backend_validates_urls_and_uses_the_config_token(make_server, monkeypatch):
    for bad in ("lm://127.0.0.1", "lm://:80", "shm://a/b", "nope", "redis://h:1"):
        with pytest.raises(ValueError):
            open_backend(bad)
    monkeypatch.setitem(BACKENDS, "later", "splitwise_local.store.not_written_yet:open_later")
    with pytest.raises(ValueError, match="not available"):
        open_backend("later://somewhere")
    server = make_server(auth_token="s3cret")
    config = SplitwiseConfig(store_auth_token="s3cret")
    with open_backend(server.tcp_url, config) as client:
        assert client.stats()["items"] == 0


def test_asyncio_client_on_both_schemes(server, clients):
    tcp, _ = clients

    async def scenario(url: str) -> None:
        async with AsyncStoreClient(url) as client:
            values = {f"k{i}": make_value(f"{url}{i}", 70_000 + i) for i in range(8)}
            await asyncio.gather(*(client.put(k, v) for k, v in values.items()))
            got = await client.get_many([*values, "missing"])
            assert [bytes(v) for v in got[:-1]] == list(values.values()) and got[-1] is None
            assert await client.exists(list(values)) == 8
            assert await client.delete("k0") and await client.get("k0") is None
            assert (await client.stats())["items"] >= 7
            with pytest.raises(ValueTooLarge):
                await client.put("huge", b"x" * (server.index.max_value + 1))
            assert bytes(tcp.get("k1")) == values["k1"]

    asyncio.run(scenario(server.tcp_url))
    asyncio.run(scenario(server.shm_url))
