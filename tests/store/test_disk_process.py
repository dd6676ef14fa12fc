"""The disk tier of a real `store` process: past both caps, killed with SIGKILL, restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from splitwise_local.store import StoreError, open_backend
from splitwise_local.store.disk import HEADER, parse_header
from tests.store.helpers import make_value, seed_of, store_process
from tests.store.test_disk_server import settle

MiB = 1024 * 1024
GiB = 1024**3


def disk_args(path: Path, dram: int, disk: int) -> list[str]:
    sizes = ["--max-size-gb", str(dram / GiB), "--max-disk-gb", str(disk / GiB)]
    return [*sizes, "--local-disk", str(path)]


def files(path: Path) -> dict[str, int]:
    """The value files (name -> bytes) and unfinished writes in the tier's directory."""
    return {p.name: p.stat().st_size for p in path.iterdir() if p.suffix in (".kv", ".tmp")}


def keys_on_disk(path: Path) -> set[str]:
    keys = set()
    for name in files(path):
        if name.endswith(".kv"):
            with open(path / name, "rb") as file:
                keys.add(parse_header(file.read(HEADER + 512)).key.decode())
    return keys


def kill(store) -> None:
    store.process.send_signal(signal.SIGKILL)
    store.process.wait(timeout=10)


def test_past_both_caps_killed_and_restarted_the_disk_serves_what_it_holds(tmp_path):
    """Acceptance: 40 MiB through 8 MiB of DRAM and a 16 MiB disk; SIGKILL; a new store on the
    same directory serves every value that reached disk, byte for byte; a corrupted file is a
    counted miss; the disk's cap holds throughout."""
    path, dram, cap = tmp_path / "disk", 8 * MiB, 16 * MiB
    values = {f"k{i:02}": make_value(f"k{i:02}", MiB - 4096) for i in range(40)}
    with store_process(*disk_args(path, dram, cap)) as store, open_backend(store.shm_url) as shm:
        for key, value in values.items():
            shm.put(key, value)
            settle(shm)  # each written before the next: none skipped, the caps are what evicts
        stats = shm.stats()
        assert stats["tiers"]["dram"]["evictions"] >= 32 and stats["tiers"]["disk"]["evictions"]
        assert stats["tiers"]["disk"]["bytes"] == sum(files(path).values()) <= cap
        kill(store)
    on_disk = keys_on_disk(path)
    assert len(on_disk) == 16 and on_disk == {f"k{i:02}" for i in range(24, 40)}
    corrupt = sorted(files(path))[0]
    with open(path / corrupt, "r+b") as file:
        file.seek(-10, os.SEEK_END)
        file.write(b"\xff" * 10)
    with store_process(*disk_args(path, dram, cap)) as store, open_backend(store.tcp_url) as tcp:
        assert tcp.stats()["tiers"]["disk"]["items"] == 16
        served = {key for key in values if tcp.get(key) is not None}
        assert len(served) == 15 and served < on_disk
        for key in served:
            assert tcp.get(key) == values[key]
        disk = tcp.stats()["tiers"]["disk"]
        assert disk["errors"] == 1 and disk["items"] == 15
        for key in ("n1", "n2", "n3"):
            tcp.put(key, make_value(key, MiB - 4096))
            settle(tcp)
        assert sum(files(path).values()) <= cap


def test_killed_mid_write_a_restart_serves_every_whole_file_and_drops_the_rest(tmp_path):
    """SIGKILL while the writer is inside a file (a `.tmp` is seen): after a restart nothing
    torn is served, every file that was complete is, and the unfinished one is gone."""
    path, size = tmp_path / "disk", 16 * MiB
    values = {f"w{i:03}": make_value(f"w{i:03}", size) for i in range(12)}
    caught = 0
    for attempt in range(5):  # a kill usually lands mid-write; try again when it did not
        with store_process(*disk_args(path, 64 * MiB, GiB)) as store:
            writing = threading.Thread(target=put_all, args=(store.shm_url, values, attempt))
            writing.start()
            seen = wait_for_unfinished_write(path)
            kill(store)
            writing.join(timeout=60)
        left = files(path)
        unfinished = [name for name in left if name.endswith(".tmp")]
        caught += bool(seen and unfinished)
        complete = keys_on_disk(path)  # an older file of a key replaced later counts once
        outdated = len(left) - len(unfinished) - len(complete)
        with store_process(*disk_args(path, 64 * MiB, GiB)) as store:
            with open_backend(store.tcp_url) as tcp:
                disk = tcp.stats()["tiers"]["disk"]
                assert disk["items"] == len(complete)
                assert disk["dropped"] == len(unfinished) + outdated
                for key in values:
                    value = tcp.get(key)
                    assert (value is None) == (key not in complete)
                    if value is not None:
                        assert seed_of(value) == key and value == values[key]
            assert not [name for name in files(path) if name.endswith(".tmp")]
        if caught:
            break
    assert caught, "no kill landed inside a write in five tries"


def put_all(url: str, values: dict[str, bytes], attempt: int) -> None:
    """Puts the values again and again until the store goes away."""
    try:
        with open_backend(url) as client:
            for round_ in range(3):
                for key, value in values.items():
                    client.put(f"{key}" if round_ == 0 else f"{key}-{attempt}-{round_}", value)
    except StoreError:
        pass  # killed


def wait_for_unfinished_write(path: Path) -> bool:
    """Waits (a hang guard, no timing) until a `.tmp` file is there; whether one was seen."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and any(name.endswith(".tmp") for name in os.listdir(path)):
            return True
    return False


def test_the_disk_settings_come_from_the_config_file_and_flags(tmp_path):
    config = tmp_path / "store.yaml"
    config.write_text(
        f"max_local_cpu_size: 0.01\nlocal_disk: file://{tmp_path}/from-file\n"
        "max_local_disk_size: 0.02\n"
    )
    with store_process("--config", str(config)) as store, open_backend(store.tcp_url) as tcp:
        disk = tcp.stats()["tiers"]["disk"]
        assert disk["path"] == f"{tmp_path}/from-file" and disk["capacity"] == int(0.02 * GiB)
    with (
        store_process("--config", str(config), "--local-disk", str(tmp_path / "flag")) as store,
        open_backend(store.tcp_url) as tcp,
    ):
        assert tcp.stats()["tiers"]["disk"]["path"] == str(tmp_path / "flag")
    with store_process("--max-size-gb", "0.01") as store, open_backend(store.tcp_url) as tcp:
        assert "disk" not in tcp.stats()["tiers"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--local-disk", "DIR"], "needs a positive --max-disk-gb"),
        (["--local-disk", "DIR", "--max-disk-gb", "0.01"], "in use by another store"),
        (["--local-disk", "/proc/nowhere", "--max-disk-gb", "0.01"], "cannot start"),
    ],
)
def test_a_disk_tier_that_cannot_be_used_stops_the_store_at_start(tmp_path, args, message):
    path = tmp_path / "disk"
    args = [str(path) if arg == "DIR" else arg for arg in args]
    command = [sys.executable, "-m", "splitwise_local", "store", "--port", "0"]
    with store_process("--max-size-gb", "0.01", "--local-disk", str(path), "--max-disk-gb", "0.01"):
        result = subprocess.run(
            [*command, "--max-size-gb", "0.01", *args], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1 and message in result.stderr, result.stderr
