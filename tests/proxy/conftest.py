"""Fixtures: fake engines and proxies served by real uvicorn servers on free ports; for routing,
the embedded model's tokenizer and a real store."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator

import pytest

from splitwise_local.config import SplitwiseConfig, dump_config
from splitwise_local.models.checkpoint import prepare_default_model
from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.settings import ProxySettings
from splitwise_local.proxy.tokens import PromptTokenizer
from splitwise_local.store.server import ServerSettings, StoreServer
from splitwise_testing.fake_engine import FakeBehaviour, FakeEngine
from tests.proxy.routes import CHUNK, THRESHOLD
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


@pytest.fixture(scope="module")
def model():
    return prepare_default_model()


@pytest.fixture(scope="module")
def tokenizer(model):
    return PromptTokenizer(model)


@pytest.fixture
def store():
    server = StoreServer(
        ServerSettings(capacity=8 << 20, port=0, shm_name=f"routing-{uuid.uuid4().hex[:8]}")
    ).start()
    yield server
    server.stop()


@pytest.fixture
def kv_config(tmp_path, store):
    config = SplitwiseConfig(chunk_size=CHUNK, remote_url=store.tcp_url)
    return config, dump_config(config, tmp_path / "splitwise.yaml")


@pytest.fixture
def routed(fake, proxy, model, kv_config):
    """`engines, url = routed(prefill=1, decode=1, **settings)`: fakes and a routing proxy."""

    def start(prefill: int = 1, decode: int = 1, adapters: dict | None = None, **settings):
        adapters = adapters or {}
        engines = {
            "prefill": [fake(name=f"prefill{i}", adapters=adapters) for i in range(prefill)],
            "decode": [fake(name=f"decode{i}", tokens=3, adapters=adapters) for i in range(decode)],
        }
        values = dict(
            prefill=[url for _, url in engines["prefill"]],
            decode=[url for _, url in engines["decode"]],
            model=str(model),
            kv_config=str(kv_config[1]),
            disagg_threshold_tokens=THRESHOLD,
            route_detail=True,
        )
        return engines, proxy(**{**values, **settings})

    return start
