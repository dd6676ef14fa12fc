"""make_serde from the config's options; decode_any reads whatever any serde wrote."""

from __future__ import annotations

import pytest
import torch

from splitwise_local.config import SerdeOptions, SplitwiseConfig
from splitwise_local.serde import (
    SERDES,
    CacheGenSerde,
    KiviSerde,
    SerdeError,
    decode_any,
    make_serde,
)
from splitwise_local.serde.base import read_payload


def test_every_configurable_serde_is_registered() -> None:
    assert set(SERDES) == set(SplitwiseConfig.model_fields["remote_serde"].annotation.__args__)


def test_options_reach_the_serde_and_its_header(ragged_chunk: torch.Tensor) -> None:
    options = SerdeOptions(bits=2, group_size=16)
    kivi = make_serde("kivi", options)
    assert isinstance(kivi, KiviSerde) and (kivi.bits, kivi.group_size) == (2, 16)
    assert read_payload(kivi.encode(ragged_chunk))[0].params == {"bits": 2, "group_size": 16}
    cachegen = make_serde("cachegen", options)
    assert isinstance(cachegen, CacheGenSerde) and cachegen.group_size == 16
    assert make_serde("naive", options).name == "naive"


def test_a_reader_decodes_whatever_a_writer_used(ragged_chunk: torch.Tensor) -> None:
    writers = [make_serde(name, SerdeOptions(bits=8, group_size=64)) for name in SERDES]
    for writer in writers:
        decoded, meta = decode_any(writer.encode(ragged_chunk, meta={"by": writer.name}))
        assert meta == {"by": writer.name}
        assert decoded.shape == ragged_chunk.shape
        assert (decoded.float() - ragged_chunk.float()).norm() < 0.02 * ragged_chunk.float().norm()


def test_unknown_serde_name() -> None:
    with pytest.raises(SerdeError, match="unknown serde 'lz4'"):
        make_serde("lz4")
