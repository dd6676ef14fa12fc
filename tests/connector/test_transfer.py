"""The worker's data path against a real store: save, asynchronous load, and every failure a
load can meet turned into blocks to recompute (never an exception), with the guard backing off
from a dead store and the client reconnecting once it is back on the same address; saves that
never wait for the store (a bounded queue that drops what does not fit), a store slow to write
that never switches loads off, and a load reported done only once its copies have landed."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import pytest
import torch

from splitwise_local.connector.codec import ChunkCodec
from splitwise_local.connector.health import StoreGuard
from splitwise_local.connector.keys import KeyIdentity
from splitwise_local.connector.layout import LayerCaches, PagedLayout, slots_for
from splitwise_local.connector.loader import KVLoader
from splitwise_local.connector.metrics import Counters
from splitwise_local.connector.planner import LoadPlan, SavePlan, prompt_chunks
from splitwise_local.connector.saver import KVSaver
from splitwise_local.serde import decode_any
from splitwise_local.store.backend import open_backend
from splitwise_local.store.client import ShmClient
from splitwise_local.store.server import ServerSettings, StoreServer
from splitwise_testing.slow_store import hold_writes
from tests.store.helpers import unique_name

pytestmark = pytest.mark.timeout(120)

LAYOUT = PagedLayout(heads=2, head_size=8, block_size=16, kv_cache_layout="LBHNC")
TOKENS = 100  # chunks of 32: 0-32, 32-64, 64-96, 96-100
SOURCE_BLOCKS = list(range(7))
TARGET_BLOCKS = [7, 6, 5, 4, 3, 2, 1]


@pytest.fixture
def source():
    generator = torch.Generator().manual_seed(0)
    buffer = torch.randn(3, 8, 2, 16, 16, generator=generator)  # 3 layers, one buffer
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


def save(caches, chunks, backend, codec=None):
    """Saves every chunk from the source blocks; returns the saver's counters."""
    counters = Counters()
    saver = KVSaver(lambda: backend, codec or ChunkCodec("naive"), LAYOUT, caches, rank=0,
                    guard=StoreGuard("test"), counters=counters)  # fmt: skip
    saver.save([SavePlan("save", chunks, SOURCE_BLOCKS)])
    saver.close()
    return counters.take()


def load(chunks, backend, *, end=TOKENS - 1, tail=TOKENS - 1, guard=None, codec=None):
    """Runs one async load to its end; returns the target caches, the loader's report, stats."""
    target = LayerCaches([torch.zeros(8, 2, 16, 16) for _ in range(3)])
    counters = Counters()
    loader = KVLoader(lambda: backend, LAYOUT, target, rank=0, guard=guard or StoreGuard("t"),
                      counters=counters, verify=True, codec=codec)  # fmt: skip
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


@pytest.mark.parametrize(
    ("damage", "sealed"),
    [
        ("missing", False),
        ("corrupt", False),
        ("missing", True),
        ("corrupt", True),
        ("forged", True),
    ],
)
def test_a_bad_middle_chunk_stops_the_load_there(
    source, chunks, backend, store, damage, sealed, caplog
):
    """With the store's token, chunks are sealed: a forged one (plausible KV with valid
    checksums, written without the token) is refused like a corrupt one."""
    codec = ChunkCodec("naive", secret="launch-token") if sealed else None
    save(source, chunks, backend, codec)
    key = chunks[1].key  # tokens 32-64: blocks 2 and 3 of the request
    if damage == "missing":
        backend.delete(key)
    elif damage == "corrupt":
        value = bytearray(backend.get(key))
        value[-100] ^= 0xFF  # one flipped byte in the last layer's values
        backend.put(key, bytes(value))
    else:
        kv, _ = decode_any(backend.get(key))
        backend.put(key, ChunkCodec("naive").encode(torch.randn_like(kv)))
    with caplog.at_level(logging.WARNING, logger="splitwise_local.connector"):
        target, done, invalid, tail, stats = load(chunks, backend, codec=codec)
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
    with caplog.at_level(logging.WARNING, logger="splitwise_local.connector"):
        counters = save(source, chunks, client)
    client.close()
    assert "splitwise save req=save stops at tokens 0-" in caplog.text
    assert counters.data["save_failures"] == len(chunks)


CHUNK_BYTES = 32 * 3 * 2 * 2 * 8 * 4  # 32 tokens x 3 layers x K,V x 2 heads x 8 x float32


@pytest.fixture
def held_store():
    """A real store whose writes wait until the test opens the gate (reads never wait)."""
    gate = threading.Event()
    settings = ServerSettings(capacity=32 << 20, port=0, shm_name=unique_name())
    server = StoreServer(settings).start()
    hold_writes(server, gate.wait)
    yield server, gate
    gate.set()
    server.stop()


def other_prompt(seed: int):
    identity = KeyIdentity("test-model", "float32", LAYOUT.name, 32)
    return prompt_chunks(identity, range(seed, seed + TOKENS))


def saver_of(caches, client, counters, **options) -> KVSaver:
    return KVSaver(lambda: client, ChunkCodec("naive"), LAYOUT, caches, rank=0,
                   counters=counters, **options)  # fmt: skip


def until(condition, what: str, timeout: float = 30) -> None:
    """A hang guard, not a timing claim."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def stored(client, chunks) -> int:
    return client.exists([chunk.key for chunk in chunks])


def test_saves_never_wait_for_the_store_and_what_does_not_fit_the_queue_is_dropped(
    source, chunks, held_store, caplog
):
    server, gate = held_store
    client = open_backend(server.shm_url)
    counters = Counters()
    saver = saver_of(source, client, counters, queue_bytes=2 * CHUNK_BYTES)
    other = other_prompt(5000)
    with caplog.at_level(logging.WARNING, logger="splitwise_local.connector"):
        saver.save([SavePlan("a", chunks[:2], SOURCE_BLOCKS)])  # fits; its put is held
        saver.save([SavePlan("b", other[:1], SOURCE_BLOCKS)])  # the queue is full
        saver.save([SavePlan("a", chunks[2:], SOURCE_BLOCKS, completes_prompt=True)])
        saver.save([SavePlan("b", other[1:], SOURCE_BLOCKS)])  # b stopped at its first chunk
    # Every save returned while the store still held the first put back.
    assert saver.queued_bytes == 2 * CHUNK_BYTES and stored(client, chunks) == 0
    gate.set()
    saver.close()
    assert stored(client, chunks) == 2 and stored(client, other) == 0
    stats = counters.take().data
    assert stats["save_dropped"] == len(other) + len(chunks) - 2
    assert stats["saves"] == 1 and stats["saved_tokens"] == 64 and stats["save_failures"] == 0
    assert "splitwise save req=a stops at tokens 64-: save queue full" in caplog.text
    assert "splitwise save req=b stops at tokens 0-: save queue full" in caplog.text
    client.close()


def test_a_producer_answers_once_its_prompt_is_stored_but_never_waits_long(
    source, chunks, held_store
):
    server, gate = held_store
    client = open_backend(server.shm_url)
    counters = Counters()
    saver = saver_of(source, client, counters, answer_wait_s=0.2)
    late, behind, quick = other_prompt(5000), other_prompt(6000), other_prompt(7000)
    saver.save([SavePlan("late", late, SOURCE_BLOCKS, completes_prompt=True)])
    assert counters.take().data["save_late"] == 1  # gave up waiting, answered anyway
    assert stored(client, late) == 0
    saver.save([SavePlan("behind", behind, SOURCE_BLOCKS, completes_prompt=True)])
    assert counters.take() is None  # a put still pending: did not wait at all, not late
    gate.set()
    until(lambda: saver.queued_bytes == 0, "the held puts land once the gate opens")
    saver.save([SavePlan("quick", quick[:3], SOURCE_BLOCKS)])  # not the prompt's end: no wait
    saver.save([SavePlan("quick", quick[3:], SOURCE_BLOCKS, completes_prompt=True)])
    assert stored(client, quick) == len(quick)  # readable by anyone when save returns
    assert counters.take().data["save_late"] == 0
    saver.close()
    assert stored(client, late) == len(late) and stored(client, behind) == len(behind)
    client.close()


def test_a_store_too_slow_to_write_switches_saves_off_but_never_loads(source, chunks, held_store):
    server, gate = held_store
    gate.set()
    client = ShmClient(server.shm_name, timeout=0.5)
    save(source, chunks, client)
    gate.clear()  # from now on writes get no answer within the client's deadline
    counters = Counters()
    saver = saver_of(source, client, counters)
    saver.save([SavePlan("slow", other_prompt(5000), SOURCE_BLOCKS)])
    until(lambda: saver.guard.down, "the timed-out put opens the saves' guard")
    loads = StoreGuard("loads")
    _, done, invalid, _, stats = load(chunks, client, guard=loads)
    assert done == {"load"} and invalid == set() and not loads.down
    assert stats.data["loaded_tokens"] == TOKENS - 1
    saver.save([SavePlan("next", other_prompt(6000), SOURCE_BLOCKS)])  # skipped, not tried
    gate.set()
    saver.close()
    assert counters.take().data["save_failures"] == 2 * len(chunks)
    client.close()


class HeldCopies:
    """Stands in for `DeviceOrder`'s CUDA events (no GPU here): the job's copies "land" when
    the test says so, as an event on a busy stream completes some time after the job ends."""

    def __init__(self) -> None:
        self.landed = threading.Event()

    def mark(self):
        return None

    @contextlib.contextmanager
    def copies(self, after):
        landed: list = []
        yield landed
        landed.append(self)

    def query(self) -> bool:
        return self.landed.is_set()


def test_a_load_is_reported_only_once_its_copies_have_landed(source, chunks, backend):
    save(source, chunks, backend)
    target = LayerCaches([torch.zeros(8, 2, 16, 16) for _ in range(3)])
    copies = HeldCopies()
    loader = KVLoader(lambda: backend, LAYOUT, target, rank=0, guard=StoreGuard("t"),
                      counters=Counters(), order=copies)  # fmt: skip
    loader.submit([LoadPlan("load", chunks, 0, TOKENS - 1, TARGET_BLOCKS)])
    expected = token_rows(source, SOURCE_BLOCKS, 0, TOKENS - 1)
    until(lambda: torch.equal(token_rows(target, TARGET_BLOCKS, 0, TOKENS - 1), expected),
          "the job writes the blocks")  # fmt: skip
    until(lambda: not loader._running, "the job ends")
    assert loader.finished() == (set(), set())  # copies still in flight: vLLM must not read
    copies.landed.set()
    assert loader.finished() == ({"load"}, set())
    loader.close()
