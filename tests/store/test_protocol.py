"""Frame codecs: round trips, every malformed input a FrameError, and no clash with LMCache."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from splitwise_local.store import protocol as p
from splitwise_local.store.errors import AuthError, ProtocolError, StoreFull, ValueTooLarge


def test_header_round_trip_and_size():
    raw = p.encode_header(p.Op.PUT, 3, 99)
    assert len(raw) == 16 and raw[:4] == b"SWKV" and raw[4] == p.VERSION
    assert p.decode_header(raw) == p.Header(p.Op.PUT, 3, 99, 0)
    flagged = p.encode_header(p.Op.ALLOC, 1, 8, p.Flag.BEST_EFFORT)
    assert p.decode_header(flagged).flags == p.Flag.BEST_EFFORT


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"XXXX" + p.encode_header(1)[4:], p.Status.BAD_FRAME),
        (p.encode_header(1)[:4] + b"\x09" + p.encode_header(1)[5:], p.Status.UNSUPPORTED_VERSION),
        (p.HEADER.pack(p.MAGIC, p.VERSION, 1, 0, p.MAX_COUNT + 1, 0), p.Status.BAD_FRAME),
        (p.HEADER.pack(p.MAGIC, p.VERSION, 1, 0, 0, p.MAX_META + 1), p.Status.BAD_FRAME),
        (p.HEADER.pack(p.MAGIC, p.VERSION, 1, 4, 0, 0), p.Status.BAD_FRAME),  # unknown flag
    ],
)
def test_bad_headers_are_refused_with_the_right_status(raw, status):
    with pytest.raises(p.FrameError) as info:
        p.decode_header(raw)
    assert info.value.status == status


def test_metadata_codecs_round_trip():
    keys = [b"a", b"k" * p.MAX_KEY]
    assert p.decode_keys(p.encode_keys(keys), 2) == keys
    sized = [(b"x", 0), (b"y", 2**40)]
    assert p.decode_sized_keys(p.encode_sized_keys(sized), 2) == sized
    assert p.decode_lengths(p.encode_lengths([-1, 5]), 2) == [-1, 5]
    assert p.decode_u64s(p.encode_u64s([1, 2**63]), 2) == [1, 2**63]
    commits = [(1, b"k", 0), (2**40, b"x" * p.MAX_KEY, 2**33)]
    assert p.decode_commits(p.encode_commits(commits), 2) == commits
    grants = [p.Grant(-1, 0, []), p.Grant(70000, 7, [(0, 65536), (131072, 4464)])]
    assert p.decode_grants(p.encode_grants(grants), 2) == grants
    assert p.decode_json(p.encode_json({"a": 1})) == {"a": 1}


@pytest.mark.parametrize(
    ("decode", "meta", "count"),
    [
        (p.decode_keys, p.encode_keys([b"abc"])[:-1], 1),  # truncated key
        (p.decode_keys, p.encode_keys([b"abc"]) + b"!", 1),  # stray bytes
        (p.decode_keys, struct.pack("<H", 0), 1),  # empty key
        (p.decode_keys, struct.pack("<H", p.MAX_KEY + 1) + b"k" * (p.MAX_KEY + 1), 1),
        (p.decode_sized_keys, p.encode_keys([b"abc"]), 1),  # length missing
        (p.decode_lengths, b"\0" * 7, 1),
        (p.decode_u64s, b"\0" * 9, 1),
        (p.decode_commits, p.encode_commits([(1, b"k", 1)])[:-1], 1),
        (p.decode_grants, p.encode_grants([p.Grant(1, 1, [(0, 1)])])[:-3], 1),
        (p.decode_json, b"\xff{", None),
        (p.decode_json, b"[1]", None),
    ],
)
def test_malformed_metadata_is_a_frame_error(decode, meta, count):
    with pytest.raises(p.FrameError):
        decode(meta) if count is None else decode(meta, count)


def test_keys_are_utf8_and_bounded():
    assert p.key_bytes("ab12") == b"ab12" and p.key_bytes(b"\x00") == b"\x00"
    for bad in ("", "k" * (p.MAX_KEY + 1)):
        with pytest.raises(ValueError):
            p.key_bytes(bad)


def test_error_statuses_map_to_exceptions():
    assert isinstance(p.error_for(p.Status.AUTH_FAILED, "x"), AuthError)
    assert isinstance(p.error_for(p.Status.VALUE_TOO_LARGE, "x"), ValueTooLarge)
    assert isinstance(p.error_for(p.Status.STORE_FULL, "x"), StoreFull)
    assert isinstance(p.error_for(p.Status.BAD_FRAME, "x"), ProtocolError)
    assert "999" in str(p.error_for(999, "odd"))


def test_magic_cannot_be_mistaken_for_an_lmcache_frame():
    """The store serves LMCache's lm:// on the same port, told apart by the first four bytes."""
    from lmcache.v1 import protocol as lmcache  # heavy (it imports torch): this test only

    (as_command,) = struct.unpack("i", p.MAGIC)
    assert as_command not in {int(c) for c in lmcache.ClientCommand}
    for command in lmcache.ClientCommand:  # LMCache packs "iiiiiiiii150s", command first
        start = struct.pack("iiiiiiiii150s", command, 10, 1, 0, 0, 4, 0, 0, 0, b"key")
        with pytest.raises(p.FrameError):
            p.decode_header(start[: p.HEADER.size])


def test_the_documented_example_is_what_the_codec_produces():
    text = (Path(__file__).parents[2] / "docs" / "wire-format.md").read_text()
    block = text.split("## Example", 1)[1].split("```", 2)[1]
    request, response = (
        bytes.fromhex(" ".join(re.split(r"\s{3,}", line.strip())[0] for line in part.splitlines()))
        for part in block.replace("request:", "").split("response:")
    )
    assert request == p.frame(p.Op.GET, 1, p.encode_keys([b"ab"]))
    assert response == p.frame(p.Status.OK, 1, p.encode_lengths([3])) + b"xyz"
