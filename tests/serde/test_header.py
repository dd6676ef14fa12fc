"""The payload header: self-description, and every way a payload can be bad is a SerdeError."""

from __future__ import annotations

import struct

import pytest
import torch

from splitwise_local.serde import SerdeError, decode_any, make_serde
from splitwise_local.serde.base import ALIGN, PREFIX, Header, pack_payload, read_payload


def small_chunk(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(2, 2, 5, 3, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.fixture(params=["naive", "kivi", "cachegen"])
def payload(request) -> bytes:
    return make_serde(request.param).encode(small_chunk(), meta={"checksums": [1, 2]})


def test_header_describes_the_payload(payload: bytes) -> None:
    header, body = read_payload(payload)
    assert header.shape == (2, 2, 5, 3, 8)
    assert header.dtype == torch.bfloat16
    assert header.meta == {"checksums": [1, 2]}
    assert (len(payload) - body.nbytes) % ALIGN == 0  # the body starts aligned


def test_truncated_payload_is_rejected(payload: bytes) -> None:
    for cut in (0, 3, PREFIX.size, len(payload) // 2, len(payload) - 1):
        with pytest.raises(SerdeError, match="truncated"):
            decode_any(payload[:cut])


def test_trailing_bytes_are_rejected(payload: bytes) -> None:
    with pytest.raises(SerdeError, match="truncated or padded"):
        decode_any(payload + b"\0")


def test_bad_magic_and_version_are_rejected(payload: bytes) -> None:
    with pytest.raises(SerdeError, match="magic"):
        decode_any(b"XXXX" + payload[4:])
    with pytest.raises(SerdeError, match="version"):
        decode_any(payload[:4] + struct.pack("<H", 99) + payload[6:])


def test_corrupt_header_text_is_rejected(payload: bytes) -> None:
    corrupt = bytearray(payload)
    corrupt[PREFIX.size + 2] ^= 0x20
    with pytest.raises(SerdeError, match="header"):
        decode_any(corrupt)


def test_corrupt_body_of_a_compressed_payload_is_rejected() -> None:
    for name in ("kivi", "cachegen"):
        corrupt = bytearray(make_serde(name).encode(small_chunk()))
        corrupt[-3] ^= 0x01
        with pytest.raises(SerdeError, match="checksum"):
            decode_any(corrupt)


def test_payload_is_decoded_only_by_its_own_serde() -> None:
    payload = make_serde("kivi").encode(small_chunk())
    with pytest.raises(SerdeError, match="written by serde 'kivi'"):
        make_serde("naive").decode(payload)


def test_unknown_serde_and_bad_params_are_rejected() -> None:
    chunk = small_chunk()
    unknown = pack_payload(Header("zstd", {}, chunk.dtype, tuple(chunk.shape)), [b""], True)
    with pytest.raises(SerdeError, match="unknown serde 'zstd'"):
        decode_any(unknown)
    bad = Header("kivi", {"bits": 3, "group_size": 32}, chunk.dtype, tuple(chunk.shape))
    with pytest.raises(SerdeError, match="invalid kivi parameters"):
        decode_any(pack_payload(bad, [b"\0" * 64], True))
    bad = Header(
        "cachegen",
        {"layer_bits": [4], "group_size": 4, "max_bins": 16},
        chunk.dtype,
        (2, 2, 5, 3, 8),
    )
    with pytest.raises(SerdeError, match="invalid cachegen parameters"):
        decode_any(pack_payload(bad, [b"\0" * 64], True))


def test_shape_mismatch_is_rejected() -> None:
    chunk = small_chunk()
    body = chunk.view(torch.uint8).numpy().tobytes()
    for shape in ((2, 2, 6, 3, 8), (2, 2, 5, 3, 8, 1), (2, 3, 5, 3, 8), (0, 2, 5, 3, 8)):
        wrong = pack_payload(Header("naive", {}, chunk.dtype, shape), [body], False)
        with pytest.raises(SerdeError):
            decode_any(wrong)


def test_bad_inputs_to_encode_are_rejected() -> None:
    serde = make_serde("naive")
    with pytest.raises(SerdeError, match="expected a KV chunk"):
        serde.encode(torch.zeros(2, 3, 4))
    with pytest.raises(SerdeError, match="kv dimension"):
        serde.encode(torch.zeros(1, 3, 4, 1, 8))
    with pytest.raises(SerdeError, match="dtype"):
        serde.encode(torch.zeros(1, 2, 4, 1, 8, dtype=torch.int32))
    with pytest.raises(SerdeError, match="empty"):
        serde.encode(torch.zeros(1, 2, 0, 1, 8))
    with pytest.raises(SerdeError, match="JSON"):
        serde.encode(small_chunk(), meta={"when": object()})


@pytest.mark.parametrize("name", ["kivi", "cachegen"])
def test_non_finite_values_are_rejected_at_encode(name: str) -> None:
    chunk = small_chunk(torch.float32)
    chunk[1, 0, 2, 1, 3] = float("nan")
    with pytest.raises(SerdeError, match="finite"):
        make_serde(name).encode(chunk)
