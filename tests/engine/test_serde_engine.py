"""Compressed KV through real engines: kivi and cachegen answer coherently from smaller values."""

from __future__ import annotations

import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_testing.system import start_system

pytestmark = pytest.mark.engine

BF16_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # SmolLM2: layers x (K, V) x heads x head_size x 2
LOAD_LINE = r"splitwise load req=\S+ tokens=(\d+) chunks=\d+ bytes=(\d+) .*verified=(\S+)"


@pytest.fixture(scope="module", params=["kivi", "cachegen"])
def system(request, model_dir, tmp_path_factory):
    config = SplitwiseConfig(chunk_size=256, remote_serde=request.param)
    root = tmp_path_factory.mktemp(request.param)
    roles = {"prefill": "prefill", "decode": "decode"}
    system = start_system(root, model_dir, config, roles, {"verify_loads": True})
    yield system
    system.stop()


def test_compressed_kv_gives_a_coherent_answer_from_smaller_values(system):
    prefill, decode = system.engines["prefill"], system.engines["decode"]
    question = "What is the capital of France? Answer in one sentence."
    prefill.chat(question, max_tokens=1)
    decode.new_log()
    reply = decode.chat(question, max_tokens=24)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    (tokens, size, verified), *_ = decode.expect_log(LOAD_LINE)
    assert int(tokens) == reply["usage"]["prompt_tokens"] - 1
    assert verified == "ok"  # the cache holds exactly what the serde decoded
    naive_bytes = (int(tokens) + 1) * BF16_BYTES_PER_TOKEN
    assert int(size) < naive_bytes / 2.5, f"{size} stored bytes for {naive_bytes} of bf16 KV"
