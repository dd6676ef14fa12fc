"""Fixtures: fake engines and proxies served by real uvicorn servers on free ports."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.fake_engine import FakeBehaviour, FakeEngine
from splitwise_local.proxy.settings import ProxySettings
from tests.proxy.servers import Servers


@pytest.fixture
def dead_url() -> Callable[[], str]:
    """Makes URLs nothing listens on (connection refused)."""

    def make() -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return f"http://127.0.0.1:{sock.getsockname()[1]}"

    return make


@pytest.fixture
def servers() -> Iterator[Servers]:
    running = Servers()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def fake(servers: Servers) -> Callable[..., tuple[FakeEngine, str]]:
    """Starts a fake engine: `engine, url = fake(name="decode", tokens=4)`."""

    def start(**behaviour) -> tuple[FakeEngine, str]:
        engine = FakeEngine(FakeBehaviour(**behaviour))
        return engine, servers.serve(engine.app)

    return start


@pytest.fixture
def proxy(servers: Servers) -> Callable[..., str]:
    """Starts a proxy app: `url = proxy(prefill=[...], decode=[...], **settings)`."""

    def start(**settings) -> str:
        return servers.serve(build_app(ProxySettings(**settings)))

    return start
