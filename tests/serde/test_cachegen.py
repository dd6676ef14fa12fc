"""cachegen: the per-element bound of its quantizer on real KV, the layer schedule, anchor
deltas, entropy coding that shrinks the payload, and payloads whose structure is inconsistent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitwise_local.serde import CacheGenSerde, KiviSerde, SerdeError, decode_any
from splitwise_local.serde.base import channel_segments, pack_payload, read_payload
from splitwise_local.serde.cachegen import (
    COUNTS,
    LEVEL_LIMIT,
    anchor_reference,
    layer_bits_schedule,
    undo_anchor_deltas,
)
from tests.serde.helpers import mla_chunk, relative_error


def expected_steps(chunk: torch.Tensor, layer_bits: list[int]) -> torch.Tensor:
    """The coarsest step any element may get, from the scheme's definition: std of the
    (layer, kv, segment) times 2**(2 - bits), floored so levels stay within LEVEL_LIMIT
    (values of small tokens get finer steps still)."""
    layers, kvs, tokens = chunk.shape[:3]
    x = chunk.float().reshape(layers, kvs, tokens, -1)
    steps = torch.empty_like(x)
    for a, b in channel_segments(chunk.shape):
        part = x[..., a:b]
        sigma = part.var(dim=2, correction=0).mean(-1).sqrt()
        step = sigma * torch.exp2(2 - torch.tensor(layer_bits, dtype=torch.float32))[:, None]
        step = torch.maximum(step, part.abs().amax(dim=(2, 3)) / LEVEL_LIMIT)
        steps[..., a:b] = step[:, :, None, None]
    return steps.reshape(chunk.shape)


def assert_within_step(chunk: torch.Tensor, decoded: torch.Tensor, layer_bits: list[int]) -> None:
    rounding = decoded.float().abs() * torch.finfo(chunk.dtype).eps
    bound = expected_steps(chunk, layer_bits) * 0.5 * (1 + 1e-5) + rounding
    excess = ((decoded.float() - chunk.float()).abs() - bound).max()
    assert excess <= 1e-6, f"error exceeds half a step by {excess}"


def header_bits(payload: bytes) -> list[int]:
    return read_payload(payload)[0].params["layer_bits"]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_errors_within_half_a_step_on_real_kv(real_chunk: torch.Tensor, bits: int) -> None:
    chunk = real_chunk if bits == 4 else real_chunk[::5].contiguous()  # all layers once
    payload = CacheGenSerde(bits=bits, group_size=32).encode(chunk)
    decoded, _ = decode_any(payload)
    assert decoded.shape == chunk.shape and decoded.dtype == chunk.dtype
    assert header_bits(payload) == layer_bits_schedule(chunk.shape[0], bits)
    assert_within_step(chunk, decoded, header_bits(payload))


def test_shallow_layers_get_more_bits_and_less_error(real_chunk: torch.Tensor) -> None:
    schedule = layer_bits_schedule(30, 4)
    assert schedule == [5] * 10 + [4] * 20
    assert layer_bits_schedule(3, 2) == [3, 2, 2]
    decoded, _ = decode_any(CacheGenSerde(bits=4).encode(real_chunk))
    errors = [relative_error(decoded[i], real_chunk[i]) for i in range(30)]
    assert sum(errors[:10]) / 10 < 0.7 * sum(errors[10:]) / 20
    for layer, error in enumerate(errors):  # half a step is at most 2 ** (1 - bits) of the std
        assert error <= 2.0 ** (1 - schedule[layer]) + 2**-7


def test_explicit_layer_bits_are_recorded(ragged_chunk: torch.Tensor) -> None:
    layer_bits = [8] * 5 + [2] * 25
    payload = CacheGenSerde(layer_bits=layer_bits, group_size=10).encode(ragged_chunk)
    assert header_bits(payload) == layer_bits
    assert_within_step(ragged_chunk, decode_any(payload)[0], layer_bits)
    with pytest.raises(SerdeError, match="invalid cachegen parameters for 30 layers"):
        CacheGenSerde(layer_bits=[4, 4]).encode(ragged_chunk)


def test_small_value_tokens_keep_their_relative_precision(real_chunk: torch.Tensor) -> None:
    chunk = real_chunk.clone()
    chunk[:, 1, 7] /= 64  # one token's values, as small as an attention sink's
    decoded, _ = decode_any(CacheGenSerde(bits=4).encode(chunk))
    small = relative_error(decoded[:, 1, 7], chunk[:, 1, 7])
    typical = relative_error(decoded[:, 1, 8:], chunk[:, 1, 8:])
    assert small < 2 * typical


def test_entropy_coding_beats_fixed_width_codes(real_chunk: torch.Tensor) -> None:
    cachegen = len(CacheGenSerde(bits=4, group_size=32).encode(real_chunk))
    kivi = len(KiviSerde(bits=4, group_size=32).encode(real_chunk))
    assert cachegen < kivi


def test_some_channels_choose_anchor_deltas(real_chunk: torch.Tensor) -> None:
    _, body = read_payload(CacheGenSerde(bits=4, group_size=8).encode(real_chunk[:6]))
    delta_channels, _, _ = COUNTS.unpack_from(body)
    assert 0 < delta_channels < 6 * 2 * 192


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 70),
    group=st.integers(1, 40),
    seed=st.integers(0, 2**31),
)
def test_anchor_deltas_invert(tokens: int, group: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    levels = torch.randint(
        -LEVEL_LIMIT, LEVEL_LIMIT + 1, (3, tokens), generator=gen, dtype=torch.int32
    )
    deltas = levels - anchor_reference(levels, group)
    assert int(deltas[:, 0].abs().max()) == 0
    assert int(deltas.abs().max()) <= 2 * LEVEL_LIMIT
    assert torch.equal(undo_anchor_deltas(deltas, levels[:, 0], group), levels)


def test_ragged_and_single_token_chunks(ragged_chunk: torch.Tensor) -> None:
    for chunk in (ragged_chunk, ragged_chunk[:, :, :1].contiguous()):
        payload = CacheGenSerde(bits=4, group_size=16).encode(chunk)
        assert_within_step(chunk, decode_any(payload)[0], header_bits(payload))


def test_mla_rope_dims_keep_their_own_step() -> None:
    chunk = mla_chunk()
    payload = CacheGenSerde(bits=4).encode(chunk)
    decoded, _ = decode_any(payload)
    assert_within_step(chunk, decoded, header_bits(payload))
    # With one step for all 576 dims, the 20x larger RoPE dims would set it and the latent
    # would lose most of its precision; with its own step the latent keeps ~ the same error.
    latent_error = relative_error(decoded[..., :512], chunk[..., :512])
    rope_error = relative_error(decoded[..., 512:], chunk[..., 512:])
    assert latent_error < 0.15 and rope_error < 0.15


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(real_chunk: torch.Tensor, dtype: torch.dtype) -> None:
    chunk = real_chunk[:4].to(dtype)
    payload = CacheGenSerde(bits=8).encode(chunk)
    decoded, _ = decode_any(payload)
    assert decoded.dtype == dtype
    assert_within_step(chunk, decoded, header_bits(payload))


def test_zeros_constants_and_large_values() -> None:
    chunk = torch.zeros(2, 2, 40, 2, 16)
    chunk[1, 0] = 0.375
    chunk[1, 1, :, 1] = torch.linspace(-1e6, 1e6, 40)[:, None]
    payload = CacheGenSerde(bits=2).encode(chunk)
    decoded, _ = decode_any(payload)
    assert torch.equal(decoded[0], chunk[0])
    assert torch.equal(decoded[1, 0], chunk[1, 0])
    assert_within_step(chunk, decoded, header_bits(payload))


def repacked(payload: bytes, edit) -> bytes:
    """The payload with its body edited, under a valid header and checksum: only the serde's
    own structural checks can catch it."""
    header, body = read_payload(payload)
    return pack_payload(header, [edit(bytearray(body))], hash_body=True)


def flip_first_delta_flag(body: bytearray) -> bytearray:
    """For a [2, 2, tokens, 3, 64] chunk: skips counts, steps, words, lows, spans and bases."""
    n_delta, _, n_words = COUNTS.unpack_from(body)
    rows = 2 * 2 * 3 * 64
    body[COUNTS.size + 2 * 2 * 3 * 4 + 4 * n_words + 4 * rows + 2 * n_delta] ^= 0x80
    return body


def test_inconsistent_bodies_are_rejected(real_chunk: torch.Tensor) -> None:
    payload = CacheGenSerde(bits=4).encode(real_chunk[:2])
    cases = {
        "truncated": lambda b: b[:-5],
        "stray bytes": lambda b: b + b"\0\0",
        "delta flags": flip_first_delta_flag,
    }
    for message, edit in cases.items():
        with pytest.raises(SerdeError, match=message):
            decode_any(repacked(payload, edit))
