"""MLA through the whole data path: the tiny DeepSeek-V2 (one 576-wide latent per token).

Same checks as for SmolLM2, on a model whose KV cache is `[blocks, 1, block_size, 576]`
token-major latents (block size 16 on a CPU without AMX): token identity against a plain engine
for prompts below a block, one past a block and many blocks long; byte-level read-back of the
loaded latents; store hits and external prefix-cache hits; poisoned latents change the output.
"""

from __future__ import annotations

import re

import pytest
import torch

from splitwise_local.config import SplitwiseConfig
from splitwise_testing.system import start_system
from tests.engine.checks import References, assert_loaded, completion_tokens, first_diff

pytestmark = pytest.mark.engine

PROMPT_LENGTHS = (10, 17, 400)
SAVE_KEY = re.compile(r"splitwise save-key req=\S+ tokens=\d+-\d+ key=(\w+)")


@pytest.fixture(scope="module")
def tiny_dir():
    from splitwise_local.models.tiny_deepseek import prepare_tiny_deepseek

    return prepare_tiny_deepseek()


@pytest.fixture(scope="module")
def mla(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mla")
    roles = {"plain": "plain", "prefill": "prefill", "decode": "decode"}
    system = start_system(
        root, tiny_dir, SplitwiseConfig(chunk_size=64), roles, {"verify_loads": True}
    )
    yield system
    system.stop()


def test_mla_decode_is_token_identical_and_byte_exact(mla, prose_tokens):
    plain, prefill, decode = (mla.engines[n] for n in ("plain", "prefill", "decode"))
    references = References(plain)
    compared = 0
    for length in PROMPT_LENGTHS:
        prompt = prose_tokens[2000 : 2000 + length]
        expected = references.tokens(
            str(length), lambda e, p=prompt: completion_tokens(e.complete(p))
        )
        hits = decode.metric("vllm:external_prefix_cache_hits_total")
        decode.new_log()
        prefill.complete(prompt, max_tokens=1)
        got = completion_tokens(decode.complete(prompt))
        assert_loaded(decode, length)
        assert decode.metric("vllm:external_prefix_cache_hits_total") - hits == length - 1
        if expected is not None:
            assert got == expected, f"{length}-token prompt diverged at {first_diff(got, expected)}"
            compared += 1
    # One of the three prompts may meet a near-tie; two would leave too little judged.
    assert compared >= len(PROMPT_LENGTHS) - 1, f"only {compared} prompts judged"


def test_poisoned_latents_change_the_output(mla, prose_tokens):
    from splitwise_local.connector.codec import ChunkCodec
    from splitwise_local.serde import decode_any

    prefill, decode = mla.engines["prefill"], mla.engines["decode"]
    prompt = prose_tokens[3000:3300]
    prefill.new_log()
    prefill.complete(prompt, max_tokens=1)
    keys = SAVE_KEY.findall(prefill.wait_log(r"splitwise save req="))
    assert keys
    clean = completion_tokens(decode.complete(prompt))
    backend = mla.backend()
    originals = {key: bytes(backend.get(key)) for key in keys}
    generator = torch.Generator().manual_seed(0)
    for key, value in originals.items():
        kv, _ = decode_any(value)
        assert kv.shape[1] == 1 and kv.shape[-1] == 576  # one latent per token
        noise = torch.randn(kv.shape, generator=generator).to(kv.dtype) * kv.float().std()
        backend.put(key, ChunkCodec("naive").encode(noise))
    assert completion_tokens(decode.complete(prompt)) != clean
    for key, value in originals.items():
        backend.put(key, value)
    assert completion_tokens(decode.complete(prompt)) == clean
