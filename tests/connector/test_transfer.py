"""The worker's data path against a real store: save, asynchronous load, and every failure a
load can meet turned into blocks to recompute (never an exception), with the guard backing off
from a dead store and the client reconnecting once it is back on the same address."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from splitwise_local.connector.codec import ChunkCodec
from splitwise_local.connector.health import StoreGuard
from splitwise_local.connector.keys import KeyIdentity
from splitwise_local.connector.layout import KvFirstLayout, LayerCaches
from splitwise_local.connector.loader import KVLoader
from splitwise_local.connector.metrics import Counters
from splitwise_local.connector.planner import LoadPlan, SavePlan, prompt_chunks
from splitwise_local.connector.saver import KVSaver
from splitwise_local.store.backend import open_backend
from splitwise_local.store.server import ServerSettings, StoreServer
from tests.store.helpers import unique_name

pytestmark = pytest.mark.timeout(120)

LAYOUT = KvFirstLayout(heads=2, head_size=8, block_size=16)
TOKENS = 100  # chunks of 32: 0-32, 32-64, 64-96, 96-100
SOURCE_BLOCKS = list(range(7))
TARGET_BLOCKS = [7, 6, 5, 4, 3, 2, 1]


@pytest.fixture
def source():
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(3, 2, 8, 16, 2, 8, generator=generator)  # 3 layers, one buffer
    return LayerCaches([buffer[i] for i in range(3)])


@pytest.fixture
def chunks():
    return prompt_chunks(KeyIdentity("test-model", "float32", LAYOUT.name, 32), range(TOKENS))


@pytest.fixture
def store():
    settings = ServerSettings(capacity=32 << 20, port=0, shm_name=unique_name())
    server = StoreServer(settings).start()
    yield server
    server.stop()


@pytest.fixture(params=["shm", "tcp"])
def backend(request, store):
    client = open_backend(store.shm_url if request.param == "shm" else store.tcp_url)
    yield client
    client.close()


def save(caches, chunks, backend):
    """Saves every chunk from the source blocks; returns the saver's counters."""
    counters = Counters()
    saver = KVSaver(lambda: backend, ChunkCodec("naive"), LAYOUT, caches, rank=0,
                    guard=StoreGuard("test"), counters=counters)  # fmt: skip
    saver.save([SavePlan("save", chunks, SOURCE_BLOCKS)])
    saver.close()
    return counters.take()


def load(chunks, backend, *, end=TOKENS - 1, tail=TOKENS - 1, guard=None):
    """Runs one async load to its end; returns the target caches, the loader's report, stats."""
    target = LayerCaches([torch.zeros(2, 8, 16, 2, 8) for _ in range(3)])
    counters = Counters()
    loader = KVLoader(lambda: backend, LAYOUT, target, rank=0, guard=guard or StoreGuard("t"),
                      counters=counters, verify=True)  # fmt: skip
    loader.submit([LoadPlan("load", chunks, 0, end, TARGET_BLOCKS, tail)])
    deadline = time.monotonic() + 30
    done, invalid = set(), set()
    while not done and time.monotonic() < deadline:
        loader.wait_idle(0.1)
        done, invalid = loader.finished()
    tail_rows = loader.take_tail("load")
    loader.close()
    return target, done, invalid, tail_rows, counters.take()


def token_rows(caches: LayerCaches, blocks: list[int], start: int, end: int) -> torch.Tensor:
    from splitwise_local.connector.layout import slots_for

    return LAYOUT.gather(caches, slots_for(blocks, start, end, 16))


def test_a_load_lands_the_saved_kv_in_other_blocks_and_keeps_the_tail(source, chunks, backend):
    saved = save(source, chunks, backend)
    assert saved.data["saved_tokens"] == TOKENS and saved.data["saves"] == 1
    target, done, invalid, tail, stats = load(chunks, backend)
    assert done == {"load"} and invalid == set()
    expected = token_rows(source, SOURCE_BLOCKS, 0, TOKENS)
    assert torch.equal(token_rows(target, TARGET_BLOCKS, 0, TOKENS - 1), expected[:, :, :-1])
    assert torch.equal(tail, expected[:, :, -1:])
    assert token_rows(target, TARGET_BLOCKS, TOKENS - 1, TOKENS).abs().sum() == 0  # not written
    assert stats.data["loaded_tokens"] == TOKENS - 1 and stats.data["load_failures"] == 0
    assert save(source, chunks, backend).data["saved_tokens"] == 0  # all stored already


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_bad_middle_chunk_stops_the_load_there(source, chunks, backend, store, damage, caplog):
    save(source, chunks, backend)
    key = chunks[1].key  # tokens 32-64: blocks 2 and 3 of the request
    if damage == "missing":
        backend.delete(key)
    else:
        value = bytearray(backend.get(key))
        value[-100] ^= 0xFF  # one flipped byte in the last layer's values
        backend.put(key, bytes(value))
    with caplog.at_level(logging.WARNING, logger="splitwise_local.connector"):
        target, done, invalid, tail, stats = load(chunks, backend)
    assert done == {"load"}
    assert invalid == set(TARGET_BLOCKS[2:])  # from token 32 to the end: recomputed by vLLM
    expected = token_rows(source, SOURCE_BLOCKS, 0, 32)
    assert torch.equal(token_rows(target, TARGET_BLOCKS, 0, 32), expected)
    assert tail is None  # the load did not go through: vLLM computes the rest, tail included
    assert stats.data["load_failures"] == 1 and stats.data["loaded_tokens"] == 32
    warnings = [r for r in caplog.records if "load-partial" in r.getMessage()]
    assert len(warnings) == 1 and "recomputing tokens 32-99" in warnings[0].getMessage()


def test_a_dead_store_fails_loads_cleanly_and_a_restarted_one_serves_again(source, chunks):
    settings = ServerSettings(capacity=32 << 20, port=0, shm_name=unique_name())
    server = StoreServer(settings).start()
    address = ServerSettings(capacity=32 << 20, port=server.port, shm_name=settings.shm_name)
    client = open_backend(server.shm_url)
    guard = StoreGuard("test", first_backoff_s=0.2)
    try:
        save(source, chunks, client)
        server.stop()
        _, done, invalid, _, stats = load(chunks, client, guard=guard)
        assert done == {"load"} and invalid == set(TARGET_BLOCKS)
        assert guard.down and stats.data["load_failures"] == 1
        _, _, invalid, _, _ = load(chunks, client, guard=guard)  # backing off: not even asked
        assert invalid == set(TARGET_BLOCKS)

        server = StoreServer(address).start()  # same port and shm name, empty
        time.sleep(0.3)  # the back-off ends
        save(source, chunks, client)
        target, _, invalid, _, _ = load(chunks, client, guard=guard)
        assert invalid == set() and not guard.down
        expected = token_rows(source, SOURCE_BLOCKS, 0, TOKENS - 1)
        assert torch.equal(token_rows(target, TARGET_BLOCKS, 0, TOKENS - 1), expected)
    finally:
        client.close()
        server.stop()


def test_a_failed_save_is_counted_and_never_raises(source, chunks, store, caplog):
    client = open_backend(store.tcp_url)
    store.stop()
    with caplog.at_level(logging.ERROR, logger="splitwise_local.connector"):
        counters = save(source, chunks, client)
    client.close()
    assert "chunk saves failed" in caplog.text
    assert counters.data["save_failures"] == len(chunks)
