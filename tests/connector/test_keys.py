"""Chunk keys: chained, deterministic across processes, sensitive to everything that matters."""

import subprocess
import sys

from splitwise_local.connector.keys import KeyIdentity, chunk_keys, chunk_spans

IDENTITY = KeyIdentity("SmolLM2|LlamaForCausalLM|30", "torch.bfloat16", "per-head/3x64", 32)


def test_spans_cover_the_prompt_with_a_partial_last_chunk():
    assert chunk_spans(70, 32) == [(0, 32), (32, 64), (64, 70)]
    assert chunk_spans(20, 32) == [(0, 20)]
    assert chunk_spans(64, 32) == [(0, 32), (32, 64)]
    assert chunk_spans(0, 32) == []


def test_equal_prefixes_share_keys_and_a_change_breaks_the_chain():
    a = chunk_keys(IDENTITY, list(range(100)))
    b = chunk_keys(IDENTITY, list(range(64)) + [7] * 36)
    assert len(a) == 4
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]
    early = chunk_keys(IDENTITY, [999, *range(1, 100)])
    assert all(x != y for x, y in zip(a, early, strict=True))


def test_partial_chunk_differs_from_full_chunk_with_same_start():
    assert chunk_keys(IDENTITY, list(range(40)))[1] != chunk_keys(IDENTITY, list(range(64)))[1]


def test_identity_fields_all_change_the_keys():
    tokens = list(range(50))
    base = chunk_keys(IDENTITY, tokens)
    for other in (
        KeyIdentity("other-model", IDENTITY.dtype, IDENTITY.layout, 32),
        KeyIdentity(IDENTITY.model, "torch.float16", IDENTITY.layout, 32),
        KeyIdentity(IDENTITY.model, IDENTITY.dtype, "mla-latent/576", 32),
    ):
        assert chunk_keys(other, tokens)[0] != base[0]
    assert (
        chunk_keys(KeyIdentity(IDENTITY.model, IDENTITY.dtype, IDENTITY.layout, 16), tokens)[0]
        != base[0]
    )


def test_keys_do_not_depend_on_the_process_or_hash_seed():
    code = (
        "from splitwise_local.connector.keys import KeyIdentity, chunk_keys;"
        "print(chunk_keys(KeyIdentity('m','d','l',32), list(range(70)))[-1])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("0", "1", "12345")
    }
    assert len(outputs) == 1
    assert outputs == {chunk_keys(KeyIdentity("m", "d", "l", 32), list(range(70)))[-1]}
