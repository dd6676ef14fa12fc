from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from splitwise_local.store.server import ServerSettings, StoreServer
from tests.store.helpers import unique_name

MiB = 1024 * 1024


@pytest.fixture
def make_server() -> Iterator[Callable[..., StoreServer]]:
    """Starts in-process servers (port 0, a unique shm name); all are stopped afterwards."""
    servers: list[StoreServer] = []

    def make(**settings) -> StoreServer:
        settings.setdefault("capacity", 16 * MiB)
        settings.setdefault("port", 0)
        settings.setdefault("shm_name", unique_name())
        server = StoreServer(ServerSettings(**settings)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> StoreServer:
    return make_server()
