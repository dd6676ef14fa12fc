"""Acceptance against real vLLM CPU engines: the proxy answers what the decode engine answers.

Starts the store, a prefill and a decode engine (`splitwise_testing.system`, as the
connector tests do), serves the proxy in front of them, and compares chat and completion
answers, whole and streamed, with the decode engine's own. Marked `engine`: run alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_local.models.checkpoint import prepare_default_model
from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.settings import ProxySettings
from splitwise_testing.scrape import value
from splitwise_testing.system import System, start_system
from tests.proxy.equivalence import assert_proxy_matches_decode
from tests.proxy.servers import Servers

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def system(tmp_path_factory) -> Iterator[System]:
    roles = {"prefill": "prefill", "decode": "decode"}
    root = tmp_path_factory.mktemp("proxy-real")
    system = start_system(root, prepare_default_model(), SplitwiseConfig(), roles)
    yield system
    system.stop()


def test_proxy_answers_what_decode_alone_answers(system: System):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    servers = Servers()
    try:
        settings = ProxySettings(prefill=[prefill.url], decode=[decode.url])
        proxy = servers.serve(build_app(settings))
        assert httpx.get(proxy + "/health", timeout=10).status_code == 200
        assert_proxy_matches_decode(proxy, decode.url, decode.model)
        fallbacks = value(proxy, "splitwise_proxy_prefill_fallbacks_total")
        assert fallbacks == 0, "prefill failed"
    finally:
        servers.stop()
