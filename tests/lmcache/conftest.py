"""Fixtures for driving our store with LMCache's own code: its protocol classes and its
`lm://` remote connector (`LMCacheClient`), never a re-implementation of either."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest

os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")  # before lmcache is first imported

from splitwise_bench.store_lmcache import LMCacheClient
from tests.serve.conftest import fake_model  # noqa: F401  (shared fixtures)
from tests.store.conftest import make_server, server  # noqa: F401

MiB = 1024 * 1024


def pytest_configure(config: pytest.Config) -> None:
    # LMCache's logging setup trips a deprecation warning inside opentelemetry, once per logger.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:opentelemetry")
    # vLLM's import (test_config) uses torch.jit.script_method, which torch now deprecates.
    config.addinivalue_line("filterwarnings", "ignore:.*torch.jit.script_method:DeprecationWarning")


@pytest.fixture(autouse=True)
def prometheus_directory_left_behind() -> Iterator[None]:
    """LMCache points PROMETHEUS_MULTIPROC_DIR at /tmp/lmcache_prometheus in the process that
    builds its engine (this one): not left to the children of later tests."""
    before = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    yield
    if before is None:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = before


@pytest.fixture
def lmcache_client() -> Iterator[Callable[..., LMCacheClient]]:
    """Builds LMCache connectors to a URL; all are closed afterwards."""
    clients: list[LMCacheClient] = []

    def make(url: str, pool_gb: float = 0.05) -> LMCacheClient:
        client = LMCacheClient(url, pool_gb=pool_gb, model="splitwise-test")
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def raw() -> Iterator[Callable[[int], socket.socket]]:
    """Plain TCP connections to a port, for frames LMCache's connector would never send."""
    socks: list[socket.socket] = []

    def connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        socks.append(sock)
        return sock

    yield connect
    for sock in socks:
        sock.close()
