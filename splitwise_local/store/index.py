"""Which key lives where in the arena: the DRAM tier's LRU index, pins, eviction, counters.

A value goes through three states. `reserve` gives pages but nobody can see them (pending);
a value arriving over a socket instead `open`s an empty pending slot and `grow`s it as its
bytes arrive, so a writer that announces a large value and sends nothing evicts nothing;
`commit` names them with a key and makes the value visible to every reader at once, replacing
an older value of the same key; `abort` (or a writer that vanished) frees it unseen. So a put
that did not complete is never visible, and a put that returned is visible to all. Readers
`acquire` values, which pins them: eviction skips pinned values and a deleted or replaced
value keeps its pages until the last reader releases it, so nobody ever copies bytes that are
being overwritten.

Every value and every counter belongs to a protocol (ours, LMCache's): the one whose client
wrote the value or asked for it. The arena and the LRU are shared; the accounting is kept per
protocol so a dashboard can tell whose puts fill the store and whose reads miss, and per tier
(`tiers.py` puts a disk below this one) so it can tell which tier served them.

All methods are thread-safe; the lock is held for bookkeeping only, never while bytes move.
The `_committed`, `_deleted` and `_below` hooks, called with the lock held, are where a lower
tier hears of puts and deletes and answers lookups; here they do nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from splitwise_local.store.arena import Extent, PageAllocator, Run
from splitwise_local.store.errors import StoreFull, ValueTooLarge

OURS = "splitwise"  # the protocol label of our own clients (protocol.py)
LMCACHE = "lmcache"  # LMCache's lm:// protocol (lmcache_protocol.py)
PROTOCOLS = (OURS, LMCACHE)


class SlotState(Enum):
    PENDING = "pending"  # written, not yet visible
    LIVE = "live"  # in the index
    DROPPED = "dropped"  # evicted, deleted or replaced while pinned: freed on last release
    FREED = "freed"


@dataclass(eq=False)
class Slot:
    """One value's pages; `extents` is where its bytes are, in order. A pending slot has no
    key yet and `length` is what it can hold."""

    length: int
    runs: list[Run]
    extents: list[Extent]
    key: bytes = b""
    pins: int = 0
    state: SlotState = SlotState.PENDING
    protocol: str = OURS  # whose client wrote it
    tag: bytes = b""  # what its protocol keeps beside the value (LMCache: fmt, dtype, shape)

    @property
    def pages(self) -> int:
        return sum(count for _, count in self.runs)


@dataclass
class Counters:
    """One protocol's share: what its clients did, and what the store holds for them."""

    hits: int = 0  # values asked for and found (get, lease), in any tier
    misses: int = 0  # values asked for and absent from every tier
    lookup_hits: int = 0  # keys an exists query found
    lookup_misses: int = 0  # exists queries that stopped at an absent key
    puts: int = 0  # values committed
    evictions: int = 0  # values evicted from DRAM to make room
    aborted: int = 0  # values reserved, never committed (a failed or abandoned write)
    refused: int = 0  # puts rejected: too large, or no room (all pinned or being written)
    bytes_written: int = 0  # bytes of committed values
    bytes_read: int = 0  # bytes of values handed to readers
    items: int = 0  # values held in DRAM now
    bytes: int = 0  # bytes held in DRAM now


TOTALS = tuple(counter.name for counter in fields(Counters))


@dataclass
class TierCounters:
    """One tier's traffic, the protocols together."""

    hits: int = 0  # values asked of this tier and found in it
    misses: int = 0  # values asked of this tier and not found (the next tier is asked)
    writes: int = 0  # values written into it (DRAM: puts and promotions from disk; disk: files)
    evictions: int = 0  # values evicted (least recently used) to keep it within its cap
    errors: int = 0  # DRAM: puts refused; disk: failed writes, corrupt or unreadable files


class StoreIndex:
    """The store's state over a page allocator; the bytes themselves live in the arena."""

    def __init__(self, allocator: PageAllocator, max_value: int) -> None:
        self.allocator = allocator
        self.capacity = allocator.num_pages * allocator.page_size
        self.max_value = min(max_value, self.capacity)
        self.counters = {name: Counters() for name in PROTOCOLS}
        self.dram = TierCounters()
        self._index: OrderedDict[bytes, Slot] = OrderedDict()
        self._lock = threading.Lock()
        self._pending = 0
        self._pinned = 0

    def reserve(self, length: int, protocol: str = OURS) -> Slot:
        """Pages for a value about to be written, evicting LRU values to make room."""
        with self._lock:
            if length > self.max_value:
                self._refuse(protocol)
                raise ValueTooLarge(
                    f"value of {length} bytes exceeds the store's largest value ({self.max_value})"
                )
            slot = self._take(length, protocol)
            if slot is None:
                self._refuse(protocol)
                raise StoreFull(f"no room for {length} bytes: the rest is pinned or being written")
            return slot

    def open(self, protocol: str = OURS) -> Slot:
        """An empty pending slot, for a value whose pages `grow` adds as its bytes arrive."""
        with self._lock:
            self._pending += 1
        return Slot(0, [], [], protocol=protocol)

    def grow(self, slot: Slot, length: int) -> list[Extent]:
        """Adds whole pages for at least `length` more bytes to a slot from `open`, evicting
        LRU values to make room; returns the new pages' extents, where the next bytes go. The
        slot's `length` is its room meanwhile; `commit` trims it. Pages come from the bottom
        of the free stack, so on a fresh arena a slot grown step by step stays one extent."""
        need = self.allocator.pages_for(length)
        page = self.allocator.page_size
        with self._lock:
            if slot.state is not SlotState.PENDING:
                raise ValueError(f"cannot grow a {slot.state.value} slot")
            runs = self._allocate(need, length, slot.protocol)
            new = [(first * page, count * page) for first, count in runs]
            if slot.runs and runs[0][0] == sum(slot.runs[-1]):  # adjacent: one longer run
                first, count = slot.runs.pop()
                runs[0] = (first, count + runs[0][1])
            slot.runs.extend(runs)
            slot.length += need * page
            slot.extents = self.allocator.extents(slot.runs, slot.length)
            return new

    def check_sizes(self, lengths: Sequence[int], protocol: str = OURS) -> None:
        """Refuses (and counts as refused) a batch holding any value over the largest value,
        before a single byte of it is stored."""
        if lengths and max(lengths) > self.max_value:
            with self._lock:
                self._refuse(protocol)
            raise ValueTooLarge(f"value of {max(lengths)} bytes exceeds {self.max_value}")

    def commit(self, slot: Slot, key: bytes, length: int) -> None:
        """Makes the first `length` bytes of a reserved slot visible under `key` to every
        reader, replacing any older value; pages beyond `length` go back to the free pool."""
        with self._lock:
            self._commit(slot, key, length)
            counters = self.counters[slot.protocol]
            counters.puts += 1
            counters.bytes_written += slot.length
            self._committed(slot)

    def abort(self, slot: Slot) -> None:
        """Frees a reserved value nobody has seen (a failed or abandoned write)."""
        with self._lock:
            self._abort(slot)

    def acquire(self, keys: Sequence[bytes], protocol: str = OURS) -> list[Slot | None]:
        """Pins and returns the values present (None for a miss); release each one later."""
        with self._lock:
            found = self._lookup(keys)
            self._count_reads(found, protocol)
        return found

    def release(self, slots: Sequence[Slot]) -> None:
        with self._lock:
            for slot in slots:
                self._unpin(slot)

    def exists_prefix(self, keys: Sequence[bytes], protocol: str = OURS, touch: bool = True) -> int:
        """How many of `keys`, in order, are present in any tier; those are refreshed as
        recently used unless `touch` is false."""
        with self._lock:
            counters = self.counters[protocol]
            for n, key in enumerate(keys):
                if key in self._index:
                    if touch:
                        self._index.move_to_end(key)
                elif not self._below(key, touch):
                    counters.lookup_hits += n
                    counters.lookup_misses += 1
                    return n
            counters.lookup_hits += len(keys)
            return len(keys)

    def delete(self, key: bytes) -> bool:
        """Removes `key` from every tier; whether any held it."""
        with self._lock:
            below = self._deleted(key)
            slot = self._index.pop(key, None)
            if slot is not None:
                self._unlink(slot)
            return slot is not None or below

    def keys(self) -> list[bytes]:
        """The keys in DRAM, least recently used first (the eviction order)."""
        with self._lock:
            return list(self._index)

    def stats(self) -> dict[str, Any]:
        """Totals over the protocols at the top level, each protocol's share under
        `protocols`, each tier's numbers under `tiers`."""
        with self._lock:
            page_size = self.allocator.page_size
            shares = {name: vars(counters).copy() for name, counters in self.counters.items()}
            totals = {field: sum(share[field] for share in shares.values()) for field in TOTALS}
            dram = {"items": totals["items"], "bytes": totals["bytes"], "capacity": self.capacity}
            return {
                **totals,
                "capacity": self.capacity,
                "used_bytes": (self.allocator.num_pages - self.allocator.free_pages) * page_size,
                "page_size": page_size,
                "max_value": self.max_value,
                "pending": self._pending,
                "pinned": self._pinned,
                "protocols": shares,
                "tiers": {"dram": {**dram, **vars(self.dram)}},
            }

    def close(self) -> None:
        """Stops what the tiers below run in the background; the DRAM tier runs nothing."""

    # -- hooks for a tier below (lock held) -------------------------------------------------

    def _committed(self, slot: Slot) -> None:
        """A put made `slot` the value of its key."""

    def _deleted(self, key: bytes) -> bool:
        """`key` was deleted; whether a lower tier held it."""
        return False

    def _below(self, key: bytes, touch: bool) -> bool:
        """Whether a lower tier holds `key` (refreshed there as recently used if `touch`)."""
        return False

    # -- bookkeeping (lock held) ------------------------------------------------------------

    def _commit(self, slot: Slot, key: bytes, length: int) -> None:
        if slot.state is not SlotState.PENDING:
            raise ValueError(f"cannot commit a {slot.state.value} slot")
        if length > slot.length:
            raise ValueError(f"{length} bytes do not fit a slot of {slot.length}")
        self._pending -= 1
        self._trim(slot, length)
        slot.key = key
        old = self._index.pop(slot.key, None)
        if old is not None:
            self._unlink(old)
        slot.state = SlotState.LIVE
        self._index[slot.key] = slot
        counters = self.counters[slot.protocol]
        counters.items += 1
        counters.bytes += slot.length
        self.dram.writes += 1

    def _abort(self, slot: Slot) -> None:
        if slot.state is SlotState.PENDING:
            self.counters[slot.protocol].aborted += 1
            self._discard(slot)

    def _discard(self, slot: Slot) -> None:
        """Frees a pending slot."""
        self._pending -= 1
        self._free(slot)

    def _take(self, length: int, protocol: str) -> Slot | None:
        """A pending slot of `length` bytes, evicting LRU values; None if that cannot free
        enough."""
        need = self.allocator.pages_for(length)
        if not self._make_room(need):
            return None
        runs = self.allocator.allocate(need)
        assert runs is not None  # _make_room freed enough
        self._pending += 1
        return Slot(length, runs, self.allocator.extents(runs, length), protocol=protocol)

    def _lookup(self, keys: Sequence[bytes]) -> list[Slot | None]:
        """The DRAM values of `keys`, pinned and refreshed (None where absent)."""
        found: list[Slot | None] = []
        for key in keys:
            slot = self._index.get(key)
            if slot is None:
                self.dram.misses += 1
            else:
                self.dram.hits += 1
                self._index.move_to_end(key)
                self._pin(slot)
            found.append(slot)
        return found

    def _count_reads(self, found: Sequence[Slot | None], protocol: str) -> None:
        counters = self.counters[protocol]
        for slot in found:
            if slot is None:
                counters.misses += 1
            else:
                counters.hits += 1
                counters.bytes_read += slot.length

    def _pin(self, slot: Slot) -> None:
        if slot.pins == 0:
            self._pinned += 1
        slot.pins += 1

    def _unpin(self, slot: Slot) -> None:
        slot.pins -= 1
        if slot.pins == 0:
            self._pinned -= 1
            if slot.state is SlotState.DROPPED:
                self._free(slot)

    def _refuse(self, protocol: str) -> None:
        self.counters[protocol].refused += 1
        self.dram.errors += 1

    def _allocate(self, need: int, length: int, protocol: str) -> list[Run]:
        if not self._make_room(need):
            self._refuse(protocol)
            raise StoreFull(f"no room for {length} bytes: the rest is pinned or being written")
        runs = self.allocator.allocate(need)
        assert runs is not None  # _make_room freed enough
        return runs

    def _make_room(self, need: int) -> bool:
        """Evicts least recently used unpinned values until `need` pages are free; evicts
        nothing if even all of them would not be enough."""
        short = need - self.allocator.free_pages
        if short <= 0:
            return True
        victims = []
        for slot in self._index.values():
            if slot.pins == 0:
                victims.append(slot)
                short -= slot.pages
                if short <= 0:
                    break
        if short > 0:
            return False
        for slot in victims:
            del self._index[slot.key]
            self._unlink(slot)
            self.counters[slot.protocol].evictions += 1
            self.dram.evictions += 1
        return True

    def _unlink(self, slot: Slot) -> None:
        """A live value left the index: free it now, or when its last reader is done."""
        counters = self.counters[slot.protocol]
        counters.items -= 1
        counters.bytes -= slot.length
        if slot.pins:
            slot.state = SlotState.DROPPED
        else:
            self._free(slot)

    def _trim(self, slot: Slot, length: int) -> None:
        keep = self.allocator.pages_for(length)
        runs: list[Run] = []
        for first, count in slot.runs:
            take = min(count, keep)
            if take:
                runs.append((first, take))
            if count > take:
                self.allocator.release([(first + take, count - take)])
            keep -= take
        slot.runs = runs
        slot.length = length
        slot.extents = self.allocator.extents(runs, length)

    def _free(self, slot: Slot) -> None:
        slot.state = SlotState.FREED
        self.allocator.release(slot.runs)
