"""The arena's page allocator and the index's LRU, pin and visibility rules, in one process."""

from __future__ import annotations

import pytest

from splitwise_local.store.arena import PageAllocator, SharedArena
from splitwise_local.store.errors import StoreFull, ValueTooLarge
from splitwise_local.store.index import SlotState, StoreIndex

PAGE = 4096


def make_index(pages: int = 8, max_value: int | None = None) -> StoreIndex:
    return StoreIndex(PageAllocator(pages, PAGE), max_value or pages * PAGE)


def put(index: StoreIndex, key: bytes, pages: int = 1) -> None:
    index.commit(index.reserve(pages * PAGE), key, pages * PAGE)


def test_allocator_returns_runs_and_reuses_freed_pages_whole():
    allocator = PageAllocator(8, PAGE)
    first = allocator.allocate(3)
    assert first == [(0, 3)]
    assert allocator.extents(first, 2 * PAGE + 10) == [(0, 2 * PAGE + 10)]
    second = allocator.allocate(5)
    assert second == [(3, 5)]  # successive allocations are adjacent
    assert allocator.allocate(1) is None
    allocator.release(first)
    assert allocator.allocate(3) == first
    allocator.release(second)
    assert allocator.free_pages == 5


def test_allocator_splits_a_value_over_scattered_runs():
    allocator = PageAllocator(6, PAGE)
    runs = [allocator.allocate(1) for _ in range(6)]
    allocator.release(runs[1] + runs[3] + runs[4])
    got = allocator.allocate(3)
    assert got == [(1, 1), (3, 2)]
    assert allocator.extents(got, 3 * PAGE - 1) == [(PAGE, PAGE), (3 * PAGE, 2 * PAGE - 1)]


def test_arena_write_and_read_across_extents():
    arena = SharedArena.create("test", 4 * PAGE)
    try:
        extents = [(3 * PAGE, PAGE), (0, 100)]
        data = bytes(range(256)) * 16 + b"x" * 100
        arena.write(extents, data)
        out = memoryview(bytearray(len(data)))
        arena.read_into(extents, out)
        assert out == data
    finally:
        arena.close()


def test_reserved_value_is_invisible_until_commit_and_abort_frees_it():
    index = make_index()
    slot = index.reserve(100)
    assert index.stats()["pending"] == 1 and index.acquire([b"a"]) == [None]
    index.abort(slot)
    assert index.stats()["used_bytes"] == 0 and index.stats()["aborted"] == 1
    slot = index.reserve(100)
    index.commit(slot, b"a", 100)
    assert index.exists_prefix([b"a"]) == 1 and index.stats()["bytes"] == 100
    with pytest.raises(ValueError):
        index.commit(slot, b"b", 100)  # committed once only


def test_commit_of_a_shorter_value_gives_surplus_pages_back():
    index = make_index(pages=8)
    slot = index.reserve(5 * PAGE)
    assert index.stats()["used_bytes"] == 5 * PAGE
    with pytest.raises(ValueError):
        index.commit(slot, b"a", 5 * PAGE + 1)
    index.commit(slot, b"a", PAGE + 1)
    assert index.stats()["used_bytes"] == 2 * PAGE and slot.length == PAGE + 1
    assert sum(n for _, n in slot.runs) == 2 and sum(n for _, n in slot.extents) == PAGE + 1


def test_evicts_least_recently_used_first():
    index = make_index(pages=4)
    for key in (b"a", b"b", b"c", b"d"):
        put(index, key)
    index.release([s for s in index.acquire([b"a"]) if s])  # a is now the most recent
    put(index, b"e")
    assert index.keys() == [b"c", b"d", b"a", b"e"]
    index.exists_prefix([b"c"])  # exists refreshes too
    put(index, b"f", pages=2)
    assert index.keys() == [b"e", b"c", b"f"]
    assert index.stats()["evictions"] == 3


def test_pinned_value_survives_eviction_pressure_and_frees_on_release():
    index = make_index(pages=4)
    put(index, b"a")
    (pinned,) = index.acquire([b"a"])
    for round_ in range(3):
        for key in (b"b", b"c", b"d"):
            put(index, key + bytes([round_]))
    assert index.exists_prefix([b"a"]) == 1 and pinned.state is SlotState.LIVE
    with pytest.raises(StoreFull):
        index.reserve(4 * PAGE)  # only 3 of 4 pages could ever be freed
    assert index.exists_prefix([b"a"]) == 1
    index.release([pinned])
    put(index, b"big", pages=4)
    assert index.exists_prefix([b"a"]) == 0


def test_replaced_or_deleted_value_keeps_its_pages_while_a_reader_holds_it():
    index = make_index(pages=4)
    put(index, b"a")
    (old,) = index.acquire([b"a"])
    put(index, b"a")  # replaced while pinned
    assert old.state is SlotState.DROPPED and index.stats()["used_bytes"] == 2 * PAGE
    (new,) = index.acquire([b"a"])
    assert new is not old
    index.release([old])
    assert old.state is SlotState.FREED and index.stats()["used_bytes"] == PAGE
    assert index.delete(b"a") and not index.delete(b"a")
    assert new.state is SlotState.DROPPED
    index.release([new])
    assert index.stats()["used_bytes"] == 0


def test_oversized_value_is_refused_and_nothing_is_evicted():
    index = make_index(pages=4, max_value=2 * PAGE)
    put(index, b"a")
    with pytest.raises(ValueTooLarge):
        index.reserve(2 * PAGE + 1)
    assert index.exists_prefix([b"a"]) == 1 and index.stats()["refused"] == 1
    assert make_index(pages=4).max_value == 4 * PAGE  # never above the capacity


def test_exists_counts_the_present_prefix_and_stats_count_hits_and_misses():
    index = make_index()
    put(index, b"a")
    put(index, b"b")
    assert index.exists_prefix([b"a", b"b", b"c", b"a"]) == 2
    assert index.exists_prefix([]) == 0
    index.release([s for s in index.acquire([b"a", b"x"]) if s])
    stats = index.stats()
    assert (stats["hits"], stats["misses"], stats["items"]) == (1, 1, 2)
