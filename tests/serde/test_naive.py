"""naive: exact round trips, one copy to encode, a view of the buffer to decode."""

from __future__ import annotations

import pytest
import torch

from splitwise_local.serde import NaiveSerde, SerdeError, decode_any
from tests.serde.helpers import mla_chunk


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_exact(real_chunk: torch.Tensor, dtype: torch.dtype) -> None:
    chunk = real_chunk.to(dtype)
    kv, meta = NaiveSerde().decode(NaiveSerde().encode(chunk, meta={"layer_sums": [3]}))
    assert kv.dtype == dtype and kv.shape == chunk.shape
    assert torch.equal(kv, chunk)
    assert meta == {"layer_sums": [3]}


def test_ragged_mla_and_strided_chunks(ragged_chunk: torch.Tensor) -> None:
    strided = ragged_chunk.transpose(3, 4).contiguous().transpose(3, 4)  # not contiguous
    for chunk in (ragged_chunk, mla_chunk(), strided):
        kv, _ = decode_any(NaiveSerde().encode(chunk))
        assert torch.equal(kv, chunk)


def test_payload_is_header_plus_raw_bytes(real_chunk: torch.Tensor) -> None:
    payload = NaiveSerde().encode(real_chunk)
    raw = real_chunk.view(torch.uint8).numpy().tobytes()
    assert payload.endswith(raw)
    assert len(payload) - len(raw) < 512


def test_decode_views_the_buffer_without_copying(real_chunk: torch.Tensor) -> None:
    buffer = bytearray(NaiveSerde().encode(real_chunk))
    kv, _ = NaiveSerde().decode(buffer)
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    assert start <= kv.data_ptr() < start + len(buffer)
    assert kv.data_ptr() % 64 == start % 64  # the body is 64-byte aligned within the payload
    buffer[-1] ^= 0xFF  # the view tracks the buffer: its lifetime is the buffer's
    assert not torch.equal(kv, real_chunk)


def test_decode_to_a_device_copies_there(real_chunk: torch.Tensor) -> None:
    payload = NaiveSerde().encode(real_chunk)
    kv, _ = NaiveSerde().decode(payload, device=torch.device("cpu"))
    assert kv.device.type == "cpu"
    if torch.cuda.is_available():
        kv, _ = NaiveSerde().decode(payload, device="cuda")
        assert kv.is_cuda and torch.equal(kv.cpu(), real_chunk)
        assert torch.equal(decode_any(NaiveSerde().encode(real_chunk.cuda()))[0], real_chunk)


def test_encode_into_writes_the_same_payload_into_a_callers_buffer(
    real_chunk: torch.Tensor,
) -> None:
    payload = NaiveSerde().encode(real_chunk, meta={"n": 1})
    slot = bytearray(len(payload) + 100)  # e.g. a store slot, larger than the payload
    size = NaiveSerde().encode_into(real_chunk, slot, meta={"n": 1})
    assert size == len(payload) and slot[:size] == payload
    kv, meta = decode_any(memoryview(slot)[:size])
    assert torch.equal(kv, real_chunk) and meta == {"n": 1}
    with pytest.raises(SerdeError, match="writable buffer"):
        NaiveSerde().encode_into(real_chunk, bytearray(size - 1))
    with pytest.raises(SerdeError, match="writable buffer"):
        NaiveSerde().encode_into(real_chunk, bytes(size))
