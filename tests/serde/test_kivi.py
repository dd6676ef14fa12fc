"""kivi: per-group error bounds on real KV, tight packing, ragged groups, MLA, dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitwise_local.serde import KiviSerde, SerdeError, decode_any
from splitwise_local.serde.kivi import pack_codes, unpack_codes
from tests.serde.helpers import mla_chunk, relative_error

FP16_EPS = 2.0**-10  # fp16 keeps 11 significant bits; twice its unit roundoff


def group_bounds(x: torch.Tensor, dim: int, group: int, bits: int) -> torch.Tensor:
    """The largest error KIVI may make on each element of x [tokens, channels], grouping along
    `dim`: half a quantization step, plus the rounding of fp16 scales and zeros."""
    bound = torch.empty_like(x)
    for start in range(0, x.shape[dim], group):
        part = x.narrow(dim, start, min(group, x.shape[dim] - start))
        low, high = part.amin(dim, keepdim=True), part.amax(dim, keepdim=True)
        slack = FP16_EPS * (low.abs() + high.abs() + (high - low))
        bound.narrow(dim, start, part.shape[dim]).copy_(
            ((high - low) / ((1 << bits) - 1) / 2 + slack).expand_as(part)
        )
    return bound


def assert_within_kivi_bounds(
    chunk: torch.Tensor, decoded: torch.Tensor, bits: int, group: int
) -> None:
    layers, kvs, tokens = chunk.shape[:3]
    x = chunk.float().reshape(layers, kvs, tokens, -1)
    y = decoded.float().reshape(x.shape)
    output_rounding = y.abs() * torch.finfo(chunk.dtype).eps
    for layer in range(layers):
        for k, dim in enumerate((0, 1)[:kvs]):  # keys (and MLA) along tokens, values along channels
            bound = group_bounds(x[layer, k], dim, group, bits) + output_rounding[layer, k]
            excess = ((y[layer, k] - x[layer, k]).abs() - bound).max()
            assert excess <= 1e-6, f"layer {layer} kv {k}: error exceeds bound by {excess}"


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64])
def test_errors_within_bound_on_real_kv(real_chunk: torch.Tensor, bits: int, group: int) -> None:
    serde = KiviSerde(bits=bits, group_size=group)
    decoded, _ = serde.decode(serde.encode(real_chunk))
    assert decoded.shape == real_chunk.shape and decoded.dtype == real_chunk.dtype
    assert_within_kivi_bounds(real_chunk, decoded, bits, group)


def test_more_bits_less_error_and_less_compression(real_chunk: torch.Tensor) -> None:
    sizes, errors = [], []
    for bits in (2, 4, 8):
        serde = KiviSerde(bits=bits, group_size=64)
        payload = serde.encode(real_chunk)
        sizes.append(len(payload))
        errors.append(relative_error(decode_any(payload)[0], real_chunk))
    assert sizes[0] < sizes[1] < sizes[2]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 and errors[1] < 0.1
    # Tight packing: codes + an fp16 scale and zero per group + header.
    original = real_chunk.numel() * 2
    assert original / sizes[1] >= 3.5
    assert original / sizes[0] >= 6


def test_ragged_groups_and_odd_channel_counts(ragged_chunk: torch.Tensor) -> None:
    for group in (7, 44, 100, 500):  # remainders along tokens (44) and channels (192)
        serde = KiviSerde(bits=4, group_size=group)
        decoded, _ = decode_any(serde.encode(ragged_chunk))
        assert_within_kivi_bounds(ragged_chunk, decoded, 4, group)
    one_token = ragged_chunk[:, :, :1].contiguous()
    decoded, _ = decode_any(KiviSerde(bits=2, group_size=32).encode(one_token))
    assert_within_kivi_bounds(one_token, decoded, 2, 32)


def test_mla_latent_is_quantized_per_channel() -> None:
    chunk = mla_chunk()
    decoded, _ = decode_any(KiviSerde(bits=4, group_size=16).encode(chunk))
    assert decoded.shape == chunk.shape
    assert_within_kivi_bounds(chunk, decoded, 4, 16)
    # The RoPE dims, 20x larger, do not swamp the latent: each keeps its own relative error.
    latent_error = relative_error(decoded[..., :512], chunk[..., :512])
    rope_error = relative_error(decoded[..., 512:], chunk[..., 512:])
    assert latent_error < 0.1 and rope_error < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes(real_chunk: torch.Tensor, dtype: torch.dtype) -> None:
    chunk = real_chunk.to(dtype)
    decoded, _ = decode_any(KiviSerde(bits=8, group_size=32).encode(chunk))
    assert decoded.dtype == dtype
    assert_within_kivi_bounds(chunk, decoded, 8, 32)


def test_constant_groups_and_zeros_are_exact() -> None:
    chunk = torch.zeros(2, 2, 40, 2, 16, dtype=torch.bfloat16)
    chunk[1] = 0.375
    decoded, _ = decode_any(KiviSerde(bits=2, group_size=32).encode(chunk))
    assert torch.equal(decoded, chunk)


def test_values_beyond_fp16_range_are_rejected() -> None:
    chunk = torch.ones(1, 2, 4, 1, 8) * 1e6
    with pytest.raises(SerdeError, match="fp16 range"):
        KiviSerde().encode(chunk)


def test_decode_to_a_device(real_chunk: torch.Tensor) -> None:
    payload = KiviSerde(bits=4, group_size=32).encode(real_chunk)
    on_cpu, _ = decode_any(payload, device="cpu")
    if torch.cuda.is_available():
        on_gpu, _ = decode_any(payload, device="cuda")
        assert torch.equal(on_gpu.cpu(), on_cpu)
        # Encoding on the GPU writes the same payload as on the CPU.
        assert decode_any(KiviSerde(bits=4, group_size=32).encode(real_chunk.cuda()))[0].is_cuda


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_packing_round_trips(bits: int, n: int, seed: int) -> None:
    per_byte = 8 // bits
    padded = -(-n // per_byte) * per_byte
    codes = torch.randint(
        0, 1 << bits, (padded,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    packed = pack_codes(codes, bits)
    assert packed.numel() == padded // per_byte
    assert torch.equal(unpack_codes(packed, bits), codes)
