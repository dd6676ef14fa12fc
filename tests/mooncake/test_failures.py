"""Failures: no master, a master killed or frozen mid-run, no memory, and the connector
recomputing (never failing a request) when the store goes away."""

from __future__ import annotations

import logging
import signal

import pytest
import torch

from splitwise_local.connector.codec import ChunkCodec
from splitwise_local.connector.health import StoreGuard
from splitwise_local.connector.keys import KeyIdentity
from splitwise_local.connector.layout import LayerCaches, PagedLayout
from splitwise_local.connector.loader import KVLoader
from splitwise_local.connector.metrics import Counters
from splitwise_local.connector.planner import LoadPlan, SavePlan, prompt_chunks
from splitwise_local.connector.saver import KVSaver
from splitwise_local.serve.ports import free_port
from splitwise_local.store import StoreFull, StoreUnavailable
from splitwise_local.store.mooncake import MasterAddress, MooncakeBackend
from tests.mooncake.conftest import OPTIONS, TIMEOUT_S

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck CI run

OPERATIONS = {
    "get": lambda b: b.get("k"),
    "get_many": lambda b: b.get_many(["k", "other"]),
    "exists": lambda b: b.exists(["k"]),
    "put": lambda b: b.put("new", b"v"),
    "put_many": lambda b: b.put_many([("n1", b"1"), ("n2", b"2")]),
    "delete": lambda b: b.delete("k"),
    "stats": lambda b: b.stats(),
}


def test_no_master_is_a_clear_error():
    address = MasterAddress("127.0.0.1", free_port())
    with pytest.raises(StoreUnavailable, match="cannot reach the master"):
        MooncakeBackend(address, OPTIONS, TIMEOUT_S)


def test_killed_master_makes_every_call_unavailable(own_master, make_own_client):
    client = make_own_client()
    client.put("k", b"value")
    own_master.process.kill()
    own_master.process.wait()
    for name, operation in OPERATIONS.items():
        with pytest.raises(StoreUnavailable, match=own_master.spec.host):
            operation(client)
        assert name  # every operation failed cleanly


def test_frozen_master_times_out_and_the_client_recovers(own_master, make_own_client):
    client = make_own_client()
    client.put("k", b"value")
    own_master.process.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreUnavailable, match="timed out"):
            client.put_many([("new", b"v"), ("k", b"v2")])
    finally:
        own_master.process.send_signal(signal.SIGCONT)
    client.put("after", b"thawed")
    assert bytes(client.get("after")) == b"thawed"


def test_a_store_without_memory_is_full(make_own_client):
    """Every client that lent memory has gone: puts wait for room, then say so."""
    client = make_own_client(OPTIONS.model_copy(update={"global_segment_size": 0}))
    with pytest.raises(StoreFull, match="no segment"):
        client.put("k", b"value")
    assert client.get("k") is None


@pytest.fixture
def kv():
    """Three layers of a small FlashAttention-layout cache, a 100-token prompt in 32-token
    chunks, stored from blocks 0..6 and loaded into blocks 7..1."""
    layout = PagedLayout(heads=2, head_size=8, block_size=16, kv_cache_layout="LBHNC")
    torch.manual_seed(0)
    source = {f"layer{i}": torch.randn(8, 2, 16, 16) for i in range(3)}
    identity = KeyIdentity("test-model", "float32", layout.name, chunk_size=32)
    chunks = prompt_chunks(identity, list(range(100)))
    return layout, source, chunks


def save(layout, caches, chunks, backend) -> None:
    layers = LayerCaches(list(caches.values()))
    saver = KVSaver(lambda: backend, ChunkCodec("naive"), layout, layers, rank=0,
                    guard=StoreGuard("test"), counters=Counters())  # fmt: skip
    saver.save([SavePlan("save", chunks, list(range(7)))])
    saver.close()


def load(layout, chunks, backend) -> tuple[dict[str, torch.Tensor], set[int]]:
    target = {f"layer{i}": torch.zeros(8, 2, 16, 16) for i in range(3)}
    loader = KVLoader(lambda: backend, layout, LayerCaches(list(target.values())), rank=0,
                      guard=StoreGuard("test"), counters=Counters(), verify=True)  # fmt: skip
    loader.submit([LoadPlan("load", chunks, 0, 99, [7, 6, 5, 4, 3, 2, 1])])
    done: set[str] = set()
    while not done:
        loader.wait_idle(0.1)
        done, invalid = loader.finished()
    loader.close()
    return target, invalid


def test_connector_moves_kv_through_mooncake_and_recomputes_when_the_master_dies(
    own_master, make_own_client, kv, caplog
):
    layout, source, chunks = kv
    writer, reader = make_own_client(), make_own_client()
    save(layout, source, chunks, writer)
    assert reader.exists([chunk.key for chunk in chunks]) == len(chunks)
    target, invalid = load(layout, chunks, reader)
    assert invalid == set()
    for name in source:  # token t sits in block t // 16 there and block 7 - t // 16 here
        for token in range(99):
            block, offset = divmod(token, 16)
            assert torch.equal(target[name][7 - block, :, offset], source[name][block, :, offset])

    own_master.process.kill()
    own_master.process.wait()
    target, invalid = load(layout, chunks, reader)
    assert invalid == {7, 6, 5, 4, 3, 2, 1}  # every block recomputed by vLLM
    assert all(not cache.any() for cache in target.values())
    with caplog.at_level(logging.WARNING, logger="splitwise_local.connector"):
        save(layout, source, chunks, writer)  # a failed save never fails the request
    assert "splitwise save req=save stops at tokens 0-" in caplog.text
