"""Real servers for the proxy tests: uvicorn in background threads on free 127.0.0.1 ports."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import uvicorn
from starlette.types import ASGIApp

from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.fake_engine import FakeBehaviour, FakeEngine
from splitwise_local.proxy.settings import ProxySettings


class Servers:
    """uvicorn servers in threads on free ports, all stopped together (each takes ~0.1 s)."""

    def __init__(self) -> None:
        self._running: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def serve(self, app: ASGIApp) -> str:
        """Serves `app` on a free 127.0.0.1 port; returns its base URL once it accepts."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        self._running.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.005)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def stop(self) -> None:
        for server, _, _ in self._running:
            server.should_exit = True
        for _, thread, sock in self._running:
            thread.join(10)
            sock.close()


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
