"""A real `mooncake_master` on free loopback ports, and clients of it with small segments.

A client takes about 2 s to close (Mooncake unmounts its segment), so a module shares one
master and its clients, closed together at the end; tests that break the master get their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splitwise_local.config import MooncakeOptions
from splitwise_local.store.mooncake import MasterAddress, MooncakeBackend
from splitwise_testing.mooncake_child import SpawnedMaster, spawn_master

MiB = 1024 * 1024
# Small enough to fill in a test; the local buffer is smaller than the largest test value.
OPTIONS = MooncakeOptions(global_segment_size=64 * MiB, local_buffer_size=4 * MiB)
TIMEOUT_S = 2.0  # per-call deadline: failure tests wait this long, not Mooncake's 30 s

ClientFactory = Callable[..., MooncakeBackend]


def close_all(clients: list[MooncakeBackend]) -> None:
    threads = [threading.Thread(target=client.close) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def client_factory(master: SpawnedMaster, clients: list[MooncakeBackend]) -> ClientFactory:
    def make(options: MooncakeOptions = OPTIONS) -> MooncakeBackend:
        clients.append(MooncakeBackend(MasterAddress.parse(master.url), options, TIMEOUT_S))
        return clients[-1]

    return make


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> Iterator[SpawnedMaster]:
    log = tmp_path_factory.mktemp("mooncake") / "mooncake_master.log"
    with spawn_master(log_path=log) as master:
        yield master


@pytest.fixture(scope="module")
def make_client(master) -> Iterator[ClientFactory]:
    """Clients of the module's master (each mounts its own segment)."""
    clients: list[MooncakeBackend] = []
    yield client_factory(master, clients)
    close_all(clients)


@pytest.fixture(scope="module")
def client(make_client) -> MooncakeBackend:
    return make_client()


@pytest.fixture
def own_master(tmp_path: Path) -> Iterator[SpawnedMaster]:
    """A master for one test, which may stop or kill it."""
    with spawn_master(log_path=tmp_path / "mooncake_master.log") as master:
        yield master


@pytest.fixture
def make_own_client(own_master) -> Iterator[ClientFactory]:
    clients: list[MooncakeBackend] = []
    yield client_factory(own_master, clients)
    close_all(clients)
