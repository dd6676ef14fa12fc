"""The scheduler's store queries: answered off its thread, bounded by a deadline, backing off
from a store that is frozen (SIGSTOP) and answering again once it thaws, on a real store."""

from __future__ import annotations

import contextlib
import signal
import time

import psutil
import pytest

from splitwise_local.connector.health import MAX_BACKOFF_S, StoreDown, StoreGuard
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


class Asked:
    """The client's own `exists`, recording the keys of every call that reaches the store."""

    def __init__(self, client) -> None:
        self.client = client
        self.keys: list[list[str]] = []

    def __call__(self, keys) -> int:
        self.keys.append(list(keys))
        return self.client.exists(keys)


class Clock:
    """The guard's clock, moved by hand: its back-off lapses only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@contextlib.contextmanager
def frozen(process):
    """The store stopped (SIGSTOP, and seen stopped) for the block, running again after it."""
    process.send_signal(signal.SIGSTOP)
    try:
        until(lambda: psutil.Process(process.pid).status() == psutil.STATUS_STOPPED)
        yield
    finally:
        process.send_signal(signal.SIGCONT)


def until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout  # a hang guard, not a measure
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def ask(lookups: StoreLookups, req_id: str, keys, timeout: float = 30) -> Lookup:
    """The lookup's answer, asking again as vLLM's scheduler does while it is None."""
    answer = None

    def answered() -> bool:
        nonlocal answer
        answer = lookups(req_id, keys)
        return answer is not None

    until(answered, timeout)
    assert answer is not None
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


def test_a_frozen_store_costs_one_deadline_then_the_guard_answers_without_asking_it(store):
    spawned, client = store
    client.put("a", b"x")
    clock = Clock()
    guard = StoreGuard("t", first_backoff_s=0.5, clock=clock)
    asked = Asked(client)
    lookups = StoreLookups(asked, guard, deadline_s=0.3)
    with frozen(spawned.process):
        with pytest.raises(StoreDown, match=r"no answer within 0\.3 s"):
            ask(lookups, "r1", ["a"])  # None (ask again) until the deadline, then this
        assert guard.down
        with pytest.raises(StoreDown, match="store unavailable"):
            lookups("r2", ["b"])  # backing off: answered by the guard
    answers: list[Lookup] = []

    def answered_after_the_back_off() -> bool:
        clock.now += MAX_BACKOFF_S  # the back-off lapses; the next request asks again
        with contextlib.suppress(StoreDown):  # the frozen query may fail as the store thaws
            answers.append(ask(lookups, f"after-{clock.now}", ["a"]))
        return bool(answers)

    until(answered_after_the_back_off)
    assert answers == [Lookup(1, False)] and not guard.down
    # One worker asks the store in order: had r2 been submitted, it would have run by now.
    assert ["b"] not in asked.keys and asked.keys[0] == ["a"]
    lookups.close()


def test_never_blocks_the_scheduler_on_a_frozen_store(store):
    """An hour's deadline: had the scheduler waited for the answer or for the deadline, the
    test's timeout would end it."""
    spawned, client = store
    lookups = StoreLookups(client.exists, StoreGuard("t"), deadline_s=3600)
    with frozen(spawned.process):
        assert lookups("r", ["a"]) is None  # not known yet: vLLM asks again next step
        assert lookups("r", ["a"]) is None
    assert ask(lookups, "r", ["a"]) == Lookup(0, False)
    lookups.close()
