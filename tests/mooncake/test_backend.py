"""The mooncakestore:// backend against a real mooncake_master over TCP."""

from __future__ import annotations

import os
import threading

import pytest

from splitwise_local.config import MooncakeOptions, SplitwiseConfig
from splitwise_local.store import StoreError, StoreUnavailable, ValueTooLarge, open_backend
from splitwise_local.store.mooncake import MasterAddress, MooncakeBackend, merged_spans
from tests.mooncake.conftest import OPTIONS, MiB
from tests.store.helpers import make_value, seed_of


def test_url_names_the_master_and_its_metrics_port():
    assert MasterAddress.parse("mooncakestore://10.0.0.5:50051") == MasterAddress(
        "10.0.0.5", 50051, 9003
    )
    assert MasterAddress.parse("mooncakestore://h:1?metrics_port=7").metrics_port == 7
    for bad in (
        "mooncakestore://host",
        "mooncakestore://host:port",
        "mooncakestore://host:1/path",
        "mooncakestore://host:1?metrics=2",
        "mooncakestore://host:1?metrics_port=x",
        "lm://host:1",
    ):
        with pytest.raises(ValueError, match="mooncakestore://HOST:PORT"):
            MasterAddress.parse(bad)


def test_open_backend_uses_the_config_section(own_master):
    options = MooncakeOptions(global_segment_size=24 * MiB, local_buffer_size=MiB)
    config = SplitwiseConfig(remote_url=own_master.url, mooncake=options)
    with open_backend(own_master.url, config) as backend:
        assert isinstance(backend, MooncakeBackend)
        assert backend.stats()["capacity"] == 24 * MiB


@pytest.fixture(scope="module")
def other(make_client) -> MooncakeBackend:
    """A second client: another engine reading what the first wrote."""
    return make_client()


@pytest.mark.parametrize("size", [1, 4096, 3 * MiB + 17])
def test_round_trip_within_and_across_clients(client, other, size):
    value = make_value(str(size), size) if size > 64 else os.urandom(size)
    client.put(f"rt-{size}", value)
    assert bytes(client.get(f"rt-{size}")) == value
    assert bytes(other.get(f"rt-{size}")) == value
    other.put(f"rt-{size}", value[::-1])
    assert bytes(client.get(f"rt-{size}")) == value[::-1]


def test_values_larger_than_the_local_buffer(client):
    value = make_value("big", 3 * OPTIONS.local_buffer_size + 5)
    client.put("big", value)
    assert seed_of(client.get("big")) == "big"
    client.put_many([("a", value), ("b", make_value("b", 5 * MiB))])
    assert [seed_of(v) for v in client.get_many(["a", "b"])] == ["big", "b"]


def test_batches_keep_order_report_misses_and_exists_is_a_prefix(client):
    items = [(f"{i:040x}", make_value(str(i), 1000 * i)) for i in range(1, 30)]  # connector-like
    client.put_many(items)
    keys = [key for key, _ in items]
    got = client.get_many([*keys, "missing", keys[0]])
    assert [bytes(v) for v in got[:-2]] == [v for _, v in items]
    assert got[-2] is None and bytes(got[-1]) == items[0][1]
    assert client.exists(keys) == len(keys)
    assert client.exists([*keys[:5], "missing", *keys[5:]]) == 5
    assert client.exists([]) == 0 and client.get_many([]) == [] and client.get("nope") is None


def test_put_replaces_and_delete_respects_read_leases(client):
    client.put("d", b"first")
    client.put("d", b"second value")
    assert client.delete("d") and not client.delete("d")  # no reader: no lease
    client.put_many([("d", b"lost"), ("d", b"third")])  # the last of a batch wins
    assert bytes(client.get("d")) == b"third"  # the read holds a lease (10 s by default)
    with pytest.raises(StoreError, match="leased"):
        client.delete("d")
    assert bytes(client.get("d")) == b"third"


def test_bad_values_get_clear_errors_and_store_nothing(client):
    with pytest.raises(ValueError, match="empty value"):
        client.put_many([("bad-a", b"x"), ("bad-b", b"")])
    assert client.get("bad-a") is None
    with pytest.raises(TypeError):
        client.put("c", memoryview(bytearray(100))[::2])  # not contiguous


def test_a_full_store_evicts_and_a_value_larger_than_any_segment_is_refused(make_own_client):
    client = make_own_client(MooncakeOptions(global_segment_size=16 * MiB, local_buffer_size=MiB))
    value = os.urandom(MiB)
    for i in range(64):  # four times the capacity
        client.put(f"fill-{i}", value)
    stats = client.stats()
    assert 0 < stats["items"] < 16 and stats["bytes"] <= stats["capacity"] == 16 * MiB
    assert bytes(client.get("fill-63")) == value  # the newest survives
    with pytest.raises(ValueTooLarge, match="larger than every segment"):
        client.put("huge", bytes(17 * MiB))
    assert bytes(client.get("fill-63")) == value  # refused without evicting for it


def test_stats_count_the_masters_items_and_this_clients_hits_until_closed(make_own_client):
    writer = make_own_client()
    reader = make_own_client(MooncakeOptions(global_segment_size=16 * MiB, local_buffer_size=MiB))
    writer.put_many([("a", b"1" * 100), ("b", b"2" * 200)])
    reader.get_many(["a", "b", "c"])
    stats = reader.stats()
    assert stats["items"] == 2 and stats["bytes"] >= 300
    assert stats["capacity"] == OPTIONS.global_segment_size + 16 * MiB
    assert stats["segments"] == 2
    assert (stats["hits"], stats["misses"], stats["puts"]) == (2, 1, 0)
    assert {"evictions", "clients"} <= stats.keys()  # the master updates these on its own clock
    reader.close()
    reader.close()  # once is enough
    with pytest.raises(StoreUnavailable, match="closed"):
        reader.get("a")


def test_threads_putting_the_same_buffer_all_succeed(client):
    """The transfer engine refuses overlapping registrations; the backend copies instead."""
    value = make_value("shared", 256 * 1024)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                client.put_many([(f"t{n}-{i}-a", value), (f"t{n}-{i}-b", value)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    keys = [f"t{n}-{i}-{s}" for n in range(4) for i in range(20) for s in "ab"]
    assert {seed_of(v) for v in client.get_many(keys)} == {"shared"}


def test_slices_of_one_buffer_are_registered_once():
    import numpy as np

    block = np.zeros(100, dtype=np.uint8)
    base = block.ctypes.data
    assert merged_spans([block[0:10], block[5:20], block[20:30], block[50:60]]) == [
        (base, 30),
        (base + 50, 10),
    ]
