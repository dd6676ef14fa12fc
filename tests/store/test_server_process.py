"""The `store` subcommand as the launcher runs it: ready line, signals, no leaks, bounded RSS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from splitwise_local.config import load_config
from splitwise_local.store import AuthError, open_backend
from tests.store.helpers import store_process, unique_name

MiB = 1024 * 1024


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_then_clean_exit_on_signal_leaving_nothing_behind(signum):
    before = shm_entries()
    name = unique_name("cli")
    with store_process("--max-size-gb", "0.05", "--shm-name", name) as store:
        assert store.shm_url == f"shm://{name}" and store.tcp_url.startswith("lm://127.0.0.1:")
        with open_backend(store.shm_url) as shm, open_backend(store.tcp_url) as tcp:
            shm.put("k", b"v" * 100_000)
            assert tcp.stats()["items"] == 1
            store.process.send_signal(signum)
            assert store.process.wait(timeout=10) == 0
    assert shm_entries() == before
    with store_process("--max-size-gb", "0.05", "--shm-name", name):  # the name is free again
        pass


def test_killed_server_leaks_no_shared_memory_and_frees_its_name():
    before = shm_entries()
    name = unique_name("kill")
    with store_process("--max-size-gb", "0.05", "--shm-name", name) as store:
        with open_backend(store.tcp_url) as tcp:
            tcp.put("k", b"v" * MiB)
        store.process.send_signal(signal.SIGKILL)
        store.process.wait(timeout=10)
    assert shm_entries() == before
    with (
        store_process("--max-size-gb", "0.05", "--shm-name", name) as again,
        open_backend(again.shm_url) as shm,
    ):
        assert shm.stats()["items"] == 0


def test_second_server_on_a_taken_name_fails_clearly():
    name = unique_name("dup")
    command = [sys.executable, "-m", "splitwise_local", "store", "--port", "0"]
    with store_process("--max-size-gb", "0.01", "--shm-name", name):
        result = subprocess.run(
            [*command, "--shm-name", name, "--max-size-gb", "0.01"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1 and "taken" in result.stderr


def test_settings_come_from_the_config_file_and_flags(tmp_path: Path):
    config = tmp_path / "store.yaml"
    config.write_text("max_local_cpu_size: 0.03\nstore_auth_token: from-file\n")
    with store_process("--config", str(config), "--max-value-mb", "2") as store:
        with open_backend(store.tcp_url) as anonymous, pytest.raises(AuthError):
            anonymous.stats()
        with open_backend(store.tcp_url, load_config(config)) as client:
            stats = client.stats()
        assert stats["capacity"] == int(0.03 * 1024**3) // 65536 * 65536
        assert stats["max_value"] == 2 * MiB


def test_fill_past_capacity_keeps_rss_within_cap_and_counts_evictions():
    cap = 64 * MiB
    with store_process("--max-size-gb", str(cap / 1024**3)) as store:
        value = b"x" * MiB
        with open_backend(store.tcp_url) as tcp, open_backend(store.shm_url) as shm:
            for i in range(4 * cap // MiB):
                (tcp, shm)[i % 2].put(f"k{i}", value)
            stats = tcp.stats()
        rss = psutil.Process(store.process.pid).memory_info().rss
        assert rss <= cap * 1.1 + 100 * MiB, f"store RSS {rss / MiB:.0f} MiB"
        assert stats["evictions"] >= 3 * cap // MiB - 1
        assert stats["bytes"] <= stats["capacity"] == cap
        assert stats["arena_resident_bytes"] <= cap


def test_bad_arguments_are_refused_before_starting():
    for args in (["--max-size-gb", "0"], ["--max-size-gb", "0.01", "--page-kb", "0"]):
        result = subprocess.run(
            [sys.executable, "-m", "splitwise_local", "store", "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "cannot start" in result.stderr, result.stderr
