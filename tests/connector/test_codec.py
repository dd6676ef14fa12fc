"""Chunk seals: what a reader holding the store's token accepts, and what it refuses (a chunk
written without the token, under another token, moved to another key, or changed anywhere),
through a real store where a stranger may write (one without a token, as Mooncake is)."""

from __future__ import annotations

import pytest
import torch

from splitwise_local.connector.codec import ChunkCodec, CorruptChunk
from splitwise_local.serde.base import Header, pack_payload, read_payload
from splitwise_local.store import AuthError, open_backend
from splitwise_local.store.client import StoreClient
from splitwise_local.store.server import ServerSettings, StoreServer
from tests.store.helpers import unique_name

SHAPE = (3, 2, 32, 2, 8)
KEY = "ab" * 32
TOKEN = "launch-token"


@pytest.fixture
def make_server():
    servers = []

    def make(**settings) -> StoreServer:
        settings = {"capacity": 8 << 20, "port": 0, "shm_name": unique_name(), **settings}
        servers.append(StoreServer(ServerSettings(**settings)).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


def chunk(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("serde", ["naive", "kivi", "cachegen"])
def test_a_sealed_chunk_round_trips_under_its_token_and_key(serde):
    codec = ChunkCodec(serde, secret=TOKEN)
    kv = chunk()
    decoded = codec.decode(codec.encode(kv, KEY), SHAPE, KEY)
    if serde == "naive":
        assert torch.equal(decoded, kv)
    else:
        assert decoded.shape == kv.shape


def test_chunks_without_the_token_or_under_another_are_refused():
    reader = ChunkCodec(secret=TOKEN)
    with pytest.raises(CorruptChunk, match="not sealed"):
        reader.decode(ChunkCodec().encode(chunk(), KEY), SHAPE, KEY)
    with pytest.raises(CorruptChunk, match="MAC mismatch"):
        reader.decode(ChunkCodec(secret="another").encode(chunk(), KEY), SHAPE, KEY)
    with pytest.raises(CorruptChunk, match="no token"):  # a reader that cannot check the seal
        ChunkCodec().decode(ChunkCodec(secret=TOKEN).encode(chunk(), KEY), SHAPE, KEY)


def test_a_sealed_chunk_moved_to_another_key_is_refused():
    codec = ChunkCodec(secret=TOKEN)
    with pytest.raises(CorruptChunk, match="MAC mismatch"):
        codec.decode(codec.encode(chunk(), KEY), SHAPE, "cd" * 32)


def test_any_changed_byte_or_header_field_breaks_the_seal():
    codec = ChunkCodec(secret=TOKEN)
    sealed = codec.encode(chunk(), KEY)
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(CorruptChunk, match="MAC mismatch"):
        codec.decode(flipped, SHAPE, KEY)
    header, body = read_payload(sealed)  # the same seal on a header that says otherwise
    relabelled = Header(header.serde, header.params, header.dtype, header.shape,
                        {**header.meta, "lossless": not header.meta["lossless"]})  # fmt: skip
    with pytest.raises(CorruptChunk, match="MAC mismatch"):
        codec.decode(pack_payload(relabelled, [body], False), SHAPE, KEY)
    assert torch.equal(codec.decode(sealed, SHAPE, KEY), chunk())


def test_a_sealing_codec_needs_the_key():
    with pytest.raises(ValueError, match="store key"):
        ChunkCodec(secret=TOKEN).encode(chunk())


def test_unsealed_chunks_keep_their_per_layer_checksums():
    codec = ChunkCodec()
    value = bytearray(codec.encode(chunk()))
    assert torch.equal(codec.decode(value, SHAPE), chunk())
    value[-1] ^= 1
    with pytest.raises(CorruptChunk, match="checksum mismatch"):
        codec.decode(value, SHAPE)


def test_a_forged_chunk_in_a_real_store_is_refused_by_the_consumer(make_server):
    """A store anyone may write to: the producer's sealed chunk is replaced by a stranger's
    (plausible KV, valid checksums, no token); the consumer refuses it, so it is recomputed."""
    server = make_server()
    producer, consumer = ChunkCodec(secret=TOKEN), ChunkCodec(secret=TOKEN)
    with open_backend(server.shm_url) as engine, open_backend(server.tcp_url) as stranger:
        engine.put(KEY, producer.encode(chunk(), KEY))
        assert torch.equal(consumer.decode(engine.get(KEY), SHAPE, KEY), chunk())
        stranger.put(KEY, ChunkCodec().encode(chunk(seed=1)))
        with pytest.raises(CorruptChunk, match="not sealed"):
            consumer.decode(engine.get(KEY), SHAPE, KEY)


def test_a_store_with_the_token_refuses_writers_without_it(make_server):
    server = make_server(auth_token=TOKEN)
    with pytest.raises(AuthError), StoreClient.tcp("127.0.0.1", server.port) as stranger:
        stranger.put(KEY, ChunkCodec().encode(chunk()))
    assert server.index.stats()["items"] == 0
