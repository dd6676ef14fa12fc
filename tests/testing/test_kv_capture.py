"""The serde benchmark's bridge to transformers' caches, for per-head and MLA models."""

import torch

from splitwise_testing.kv_capture import MLA_ROPE_DIM, cache_to_kv, kv_to_cache


def test_per_head_chunks_round_trip_through_a_transformers_cache():
    kv = torch.randn(3, 2, 7, 4, 16)  # layers, K/V, tokens, heads, head_size
    cache = kv_to_cache(kv)
    assert cache.layers[0].keys.shape == (1, 4, 7, 16)
    assert torch.equal(cache_to_kv(cache), kv)


def test_mla_rows_split_into_latent_and_rope_and_back():
    kv = torch.randn(3, 1, 7, 1, 512 + MLA_ROPE_DIM)  # one 576-wide row per token
    cache = kv_to_cache(kv)
    assert cache.layers[0].keys.shape == (1, 1, 7, 512)  # the normalised latent
    assert cache.layers[0].values.shape == (1, 1, 7, MLA_ROPE_DIM)  # k_pe
    assert torch.equal(cache_to_kv(cache), kv)
