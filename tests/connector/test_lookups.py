"""The scheduler's store queries: answered off its thread, bounded by a deadline, backing off
from a store that is frozen (SIGSTOP) and answering again once it thaws, on a real store."""

from __future__ import annotations

import signal
import time

import pytest

from splitwise_local.connector.health import StoreDown, StoreGuard
from splitwise_local.connector.lookups import Lookup, StoreLookups
from splitwise_local.store.backend import open_backend
from tests.store.helpers import store_process

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store():
    with store_process("--max-size-gb", "0.1") as spawned:
        client = open_backend(spawned.shm_url)
        yield spawned, client
        client.close()


def ask(lookups: StoreLookups, req_id: str, keys, timeout: float = 5) -> Lookup:
    deadline = time.monotonic() + timeout
    while (answer := lookups(req_id, keys)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return answer


def test_answers_the_present_prefix_and_notices_a_hole(store):
    _, client = store
    for key in ("a", "b", "d"):
        client.put(key, b"x")
    lookups = StoreLookups(client.exists, StoreGuard("t"))
    assert ask(lookups, "r1", ["a", "b", "c", "d"]) == Lookup(2, True)
    assert ask(lookups, "r2", ["a", "b", "c"]) == Lookup(2, False)
    client.delete("a")
    assert ask(lookups, "r1", ["a", "b", "c", "d"]) == Lookup(2, True)  # answered once per request
    lookups.forget("r1")
    assert ask(lookups, "r1", ["a", "b", "c", "d"]) == Lookup(0, True)
    lookups.close()


def test_ranks_count_as_one_chunk(store):
    _, client = store
    for key in ("c0r0", "c0r1", "c1r0", "c2r0", "c2r1"):
        client.put(key, b"x")
    lookups = StoreLookups(client.exists, StoreGuard("t"), stride=2)
    keys = ["c0r0", "c0r1", "c1r0", "c1r1", "c2r0", "c2r1"]
    assert ask(lookups, "r", keys) == Lookup(3, True)  # chunk 1 lacks rank 1; chunk 2 is whole
    lookups.close()


def test_a_frozen_store_costs_one_deadline_then_the_guard_answers_at_once(store):
    spawned, client = store
    client.put("a", b"x")
    guard = StoreGuard("t", first_backoff_s=0.5)
    lookups = StoreLookups(client.exists, guard, deadline_s=0.3)
    spawned.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(StoreDown, match="no answer within"):
            ask(lookups, "r1", ["a"])
        assert time.monotonic() - began < 1.0  # the scheduler waited for the deadline only
        assert guard.down
        began = time.monotonic()
        with pytest.raises(StoreDown, match="store unavailable"):
            lookups("r2", ["a"])
        assert time.monotonic() - began < 0.05  # backing off: the store is not asked
    finally:
        spawned.process.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 15
    while True:  # after the back-off the next request asks again, and the store answers
        try:
            assert ask(lookups, f"after-{time.monotonic()}", ["a"]) == Lookup(1, False)
            break
        except StoreDown:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert not guard.down
    lookups.close()


def test_never_blocks_the_scheduler_beyond_its_short_wait(store):
    spawned, client = store
    lookups = StoreLookups(client.exists, StoreGuard("t"), wait_s=0.002, deadline_s=2)
    spawned.process.send_signal(signal.SIGSTOP)
    try:
        began = time.monotonic()
        assert lookups("r", ["a"]) is None  # not known yet: vLLM asks again next step
        assert time.monotonic() - began < 0.05
    finally:
        spawned.process.send_signal(signal.SIGCONT)
    assert ask(lookups, "r", ["a"]) == Lookup(0, False)
    lookups.close()
