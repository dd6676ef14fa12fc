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
    """`size` bytes (at least the header) naming `seed`, whose first 8 bytes checksum the rest,
    so a torn or mixed-up read is detectable from the value alone."""
    tag = seed.encode() + b"|"
    body = tag + (xxhash.xxh64_digest(tag) * (size // 8 + 1))[: max(size - 8 - len(tag), 0)]
    return xxhash.xxh64_digest(body) + body


def seed_of(value: bytes | memoryview) -> str:
    """The seed a whole value was made from; AssertionError if the value is torn."""
    data = bytes(value)
    assert xxhash.xxh64_digest(data[8:]) == data[:8], "torn value"
    return data[8:].split(b"|", 1)[0].decode()
