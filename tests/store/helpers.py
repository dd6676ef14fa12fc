"""Shared test helpers: unique shm names, a store server process, checksummed values."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import xxhash

_counter = itertools.count()


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid()}-{next(_counter)}"


@dataclass
class StoreProcess:
    proc: subprocess.Popen
    tcp_url: str
    shm_url: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextmanager
def store_process(*args: str, env: dict[str, str] | None = None) -> Iterator[StoreProcess]:
    """`python -m splitwise_local store --port 0 ...` until its ready line; killed at exit."""
    command = [sys.executable, "-m", "splitwise_local", "store", "--port", "0", *args]
    if "--shm-name" not in args:
        command += ["--shm-name", unique_name("p")]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("store ready on "):
            proc.kill()
            raise RuntimeError(f"store did not start: {line!r} {proc.stderr.read()}")
        _, _, _, tcp_url, shm_url = line.split()
        yield StoreProcess(proc, tcp_url, shm_url)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def make_value(seed: str, size: int) -> bytes:
    """A value whose first 8 bytes checksum the rest, so a torn read is detectable."""
    body = (xxhash.xxh64_digest(seed.encode()) * (size // 8 + 1))[: max(size - 8, 0)]
    return xxhash.xxh64_digest(body) + body


def is_whole(value: bytes | memoryview) -> bool:
    data = bytes(value)
    return xxhash.xxh64_digest(data[8:]) == data[:8]
