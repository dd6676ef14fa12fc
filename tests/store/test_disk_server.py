"""The disk tier behind a running store: both clients, the token, /metrics, a full filesystem."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splitwise_local.config import ConfigError, load_config
from splitwise_local.store import AuthError, open_backend
from splitwise_local.store.client import ShmClient, StoreClient
from splitwise_local.store.server import StoreServer
from splitwise_local.store.tiers import DiskSettings
from tests.store.helpers import make_value, seed_of
from tests.store.test_metrics import scrape

PAGE = 4096
KiB, MiB = 1024, 1024 * 1024


def settle(client: StoreClient) -> dict:
    """Waits until the disk writer is idle; the disk tier's numbers (a hang guard, no timing)."""
    deadline = time.monotonic() + 30
    while (disk := client.stats()["tiers"]["disk"])["queued"]:
        assert time.monotonic() < deadline, f"the disk writer never caught up: {disk}"
        time.sleep(0.01)
    return disk


def put_each(client: StoreClient, keys: list[str], size: int) -> dict[str, bytes]:
    """Puts one value per key, each written to disk before the next (so none is skipped)."""
    values = {}
    for key in keys:
        values[key] = make_value(key, size)
        client.put(key, values[key])
        settle(client)
    return values


@pytest.fixture
def disk_server(make_server, tmp_path) -> Callable[..., StoreServer]:
    """A store with 256 KiB of DRAM (4 KiB pages) over a disk tier in `tmp_path/disk`."""

    def make(path: Path | None = None, disk_bytes: int = 4 * MiB, **settings) -> StoreServer:
        disk = DiskSettings(str(path or tmp_path / "disk"), disk_bytes)
        settings.setdefault("capacity", 256 * KiB)
        return make_server(page_size=PAGE, disk=disk, **settings)

    return make


def test_both_clients_read_disk_values_and_exists_counts_them(disk_server):
    server = disk_server()
    with open_backend(server.tcp_url) as tcp, open_backend(server.shm_url) as shm:
        assert isinstance(shm, ShmClient)
        keys = [f"k{i:02}" for i in range(12)]
        values = put_each(tcp, keys, 60 * KiB)  # 720 KiB through 256 KiB of DRAM
        assert b"k00" not in set(server.index.keys())  # k00 left DRAM long ago
        assert tcp.exists(keys) == 12 and shm.exists(keys, touch=False) == 12
        for i, key in enumerate(keys):
            client = (tcp, shm)[i % 2]
            assert client.get(key) == values[key]
        got: list[bytes | None] = []
        for batch in (keys[:3], keys[3:6], keys[6:9], keys[9:]):  # a batch must fit in DRAM
            shm.get_into(batch, lambda _, view: got.append(None if view is None else bytes(view)))
        assert got == [values[k] for k in keys]
        assert shm.get_many(keys[:3]) == [values[k] for k in keys[:3]]
        stats = tcp.stats()
    assert stats["tiers"]["disk"]["hits"] >= 12 and stats["hits"] == 27
    assert stats["misses"] == 0 and stats["lookup_hits"] == 24


def test_a_store_with_a_token_serves_disk_values_to_its_clients_only(disk_server, tmp_path):
    server = disk_server(auth_token="secret")
    with StoreClient.tcp("127.0.0.1", server.port, token="secret") as owner:
        values = put_each(owner, [f"k{i}" for i in range(8)], 60 * KiB)
    for client in (StoreClient.tcp("127.0.0.1", server.port), ShmClient(server.shm_name)):
        with client, pytest.raises(AuthError):
            client.get("k0")
    with (
        StoreClient.tcp("127.0.0.1", server.port, token="wrong") as stranger,
        pytest.raises(AuthError),
    ):
        stranger.exists(["k0"])
    assert server.index.stats()["tiers"]["disk"]["hits"] == 0  # nothing was read for them
    with StoreClient.tcp("127.0.0.1", server.port, token="secret") as owner:
        assert owner.get("k0") == values["k0"]


def test_the_largest_value_holds_for_values_read_back_from_disk(disk_server, tmp_path):
    """A restart with a smaller largest value never serves (or keeps) a larger file."""
    path = tmp_path / "disk"
    first = disk_server(path)
    with open_backend(first.tcp_url) as tcp:
        put_each(tcp, ["big", "also-big"], 100 * KiB)
        tcp.put("tiny", b"t" * 100)
        settle(tcp)
    first.stop()
    second = disk_server(path, max_value=64 * KiB)
    with open_backend(second.tcp_url) as tcp:
        assert tcp.get("big") is None and tcp.get("tiny") == b"t" * 100
        assert tcp.stats()["tiers"]["disk"]["dropped"] == 2


def test_metrics_count_each_tier(disk_server):
    server = disk_server(metrics_port=0)
    with open_backend(server.tcp_url) as tcp:
        values = put_each(tcp, [f"k{i}" for i in range(8)], 60 * KiB)
        assert tcp.get("k0") == values["k0"]  # from disk
        assert tcp.get("k7") == values["k7"]  # from DRAM
        assert tcp.get("nowhere") is None
        stats = tcp.stats()["tiers"]
    samples = scrape(server.metrics.url)

    def tier(name: str, which: str) -> float:
        return samples[(f"splitwise_store_tier_{name}", (("tier", which),))]

    assert tier("hits_total", "dram") == 1 and tier("hits_total", "disk") == 1
    assert tier("misses_total", "dram") == 2 and tier("misses_total", "disk") == 1
    assert tier("writes_total", "disk") == 8 and tier("writes_total", "dram") == 9
    assert tier("items", "disk") == 8 and tier("bytes", "disk") == stats["disk"]["bytes"]
    assert tier("evictions_total", "dram") == stats["dram"]["evictions"] > 0
    assert tier("capacity_bytes", "disk") == 4 * MiB
    assert tier("capacity_bytes", "dram") == 256 * KiB
    assert tier("errors_total", "disk") == 0
    assert samples[("splitwise_store_disk_queued_items", ())] == 0
    assert samples[("splitwise_store_disk_skipped_total", ())] == 0


@pytest.fixture
def small_filesystem(tmp_path) -> Iterator[Path]:
    """A 1 MiB tmpfs: a filesystem that really fills up (needs root, else skipped)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_filesystem_costs_old_files_never_a_put(disk_server, small_filesystem):
    """The filesystem (1 MiB) fills long before the tier's cap (16 MiB): a write that meets
    ENOSPC evicts the least recently used files and tries again; a value larger than the
    whole filesystem is counted as an error and not kept; puts and gets never fail."""
    path = small_filesystem / "disk"
    server = disk_server(path, disk_bytes=16 * MiB, capacity=2 * MiB)
    keys = [f"k{i:02}" for i in range(10)]
    with open_backend(server.tcp_url) as tcp:
        put_each(tcp, keys, 300 * KiB)  # three files fit the filesystem
        disk = settle(tcp)
        assert disk["writes"] == 10 and disk["items"] == 3 and disk["evictions"] == 7
        assert disk["errors"] == 0  # each write made room and went through
        tcp.put("huge", make_value("huge", 1536 * KiB))  # larger than the filesystem
        disk = settle(tcp)
        assert disk["errors"] == 1 and disk["items"] == 0  # all evicted, and still no room
        assert tcp.get("huge") is not None  # DRAM has it
        put_each(tcp, ["after"], 300 * KiB)
        assert settle(tcp)["items"] == 1
    assert not [name for name in os.listdir(path) if name.endswith(".tmp")]
    server.stop()
    again = disk_server(path, disk_bytes=16 * MiB, capacity=2 * MiB)
    with open_backend(again.tcp_url) as tcp:
        assert seed_of(tcp.get("after")) == "after"
        assert all(tcp.get(key) is None for key in keys)


def test_what_is_queued_for_the_disk_is_written_at_a_clean_stop(disk_server, tmp_path):
    path = tmp_path / "disk"
    first = disk_server(path, capacity=MiB)
    with open_backend(first.shm_url) as shm:
        values = {}
        for i in range(20):  # no pause: the writer lags behind, DRAM holds them all
            values[f"k{i:02}"] = make_value(f"k{i:02}", 30 * KiB)
            shm.put(f"k{i:02}", values[f"k{i:02}"])
    first.stop()
    second = disk_server(path)
    with open_backend(second.shm_url) as shm:
        assert second.index.stats()["tiers"]["disk"]["items"] == 20
        for key, value in values.items():
            assert seed_of(shm.get(key)) == key and shm.get(key) == value


def test_the_config_keys_are_lmcaches():
    config = load_config(
        environ={"SPLITWISE_LOCAL_DISK": "file:///var/kv/", "SPLITWISE_MAX_LOCAL_DISK_SIZE": "5"}
    )
    assert (config.local_disk, config.max_local_disk_size) == ("/var/kv/", 5.0)
    assert load_config(environ={}).local_disk is None  # DRAM only unless asked
    with pytest.raises(ConfigError, match="max_local_disk_size"):
        load_config(environ={"SPLITWISE_LOCAL_DISK": "/var/kv"})
    with pytest.raises(ConfigError, match="one directory"):
        load_config(environ={"SPLITWISE_LOCAL_DISK": "/a,/b", "SPLITWISE_MAX_LOCAL_DISK_SIZE": "1"})
