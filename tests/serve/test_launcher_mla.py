"""The launcher serves the tiny DeepSeek-V2 end to end, with MLA on, and stops cleanly."""

from __future__ import annotations

import signal

import httpx
import pytest

from splitwise_local.samples import SAMPLES, ask, chat_request, served_model
from splitwise_testing.scrape import total
from tests.serve.helpers import Launch, Ports, free_ports, leftovers, sweep

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1200)]


def test_the_tiny_deepseek_is_served_with_its_kv_through_the_store(tmp_path):
    from splitwise_local.models.tiny_deepseek import prepare_tiny_deepseek

    ports = Ports(*free_ports(5))
    launch = Launch([*ports.args(), "--model", str(prepare_tiny_deepseek())], tmp_path / "run")
    try:
        launch.wait_for("ready: http://", 900)
        url = f"http://127.0.0.1:{ports.proxy}"
        with httpx.Client(timeout=600) as client:
            model = served_model(client, url)
            for sample in SAMPLES:
                assert ask(client, url, chat_request(model, sample)).strip()
        decode = f"http://127.0.0.1:{ports.decode}"
        hits = total(decode, "vllm:external_prefix_cache_hits_total")
        assert hits > 1000  # the long sample's prompt came from the store
        assert "MLA is disabled" not in (launch.run_dir / "decode.log").read_text()
        assert launch.finish(signal.SIGTERM, timeout=120) == 0
        assert leftovers(launch.run_dir) == []
    finally:
        launch.stop()
        sweep(launch.run_dir)
