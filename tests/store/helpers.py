"""Shared test helpers: unique shm names, a store server process, checksummed values."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager

import xxhash

from splitwise_testing.store_child import SpawnedStore, spawn

_counter = itertools.count()


def unique_name(prefix: str = "t") -> str:
    return f"{prefix}{os.getpid()}-{next(_counter)}"


@contextmanager
def store_process(*args: str) -> Iterator[SpawnedStore]:
    """A `store` subprocess with a unique shm name unless one is given."""
    if "--shm-name" not in args:
        args = (*args, "--shm-name", unique_name("p"))
    with spawn(*args) as store:
        yield store


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
