"""The DRAM index with a disk tier below it (`local_disk`, `max_local_disk_size`).

Writes are write-behind: every value a put commits to DRAM is queued for one writer thread,
which copies it from its arena pages (pinned meanwhile) into a file (disk.py), in commit
order. So the disk holds what DRAM holds, and what DRAM evicted, and DRAM eviction never waits
for the disk: the least recently used value is freed at once, usually already written (the
writer goes in commit order, eviction in use order); one the writer had not reached is lost and
counted (`skipped`: the disk could not keep up with the puts). The disk has its own byte cap,
kept by evicting its least recently used files before each write; a filesystem that is full
before the cap (ENOSPC) costs as many bytes of LRU files again, and one retry.

Reads: a key missing from DRAM is looked up in the disk map; a hit reserves DRAM pages
(evicting, as a put does), reads the file straight into them, checks it and commits it as the
key's most recently used value (a promotion); the reader gets it pinned, like any DRAM hit. A
file deleted underneath is a plain miss; a corrupt one is a miss, counted (`errors`) and
deleted. `exists` sees both tiers, and a DRAM hit keeps the key's disk copy fresh too.

One lock, the index's, covers both tiers' maps, so a put that replaces or deletes a key marks
its disk copy stale in the same step (a promotion that read the old file meanwhile is dropped),
and a file finished for a value replaced meanwhile is deleted, not indexed. No file is read,
written or deleted under the lock. At start the map is rebuilt from the directory
(`Directory.scan`), least recently used first: a restarted store serves what reached disk.

Values reach the tier only through the index, so everything a session checks first (the token,
the frame limits, the largest value) holds for them; the files hold the values' bytes as they
came, chunk seals included.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from splitwise_local.store.arena import PageAllocator, SharedArena
from splitwise_local.store.disk import CorruptFile, Directory, Record, value_hash
from splitwise_local.store.index import OURS, PROTOCOLS, Slot, SlotState, StoreIndex, TierCounters

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0  # at stop, how long the writer may go on with what is queued
MAX_QUEUED = 65536  # values waiting for the writer; a put beyond that is not written (skipped)


@dataclass(frozen=True)
class DiskSettings:
    path: str  # the directory (created, mode 0700)
    capacity: int  # bytes of files it may hold


@dataclass
class DiskCounters(TierCounters):
    skipped: int = 0  # values never written: they left DRAM first, or exceed the disk's cap
    dropped: int = 0  # files deleted at start: unfinished, torn, corrupt headers, outdated


@dataclass(eq=False)
class DiskEntry:
    record: Record
    stale: bool = False  # a put replaced the key, or it was deleted: never promote this copy


class _Write(NamedTuple):
    slot: Slot  # pinned while its bytes are written
    record: Record  # value_hash still 0: hashed from the pages outside the lock


class TieredIndex(StoreIndex):
    """A `StoreIndex` whose misses fall through to a directory of files."""

    def __init__(
        self, allocator: PageAllocator, max_value: int, arena: SharedArena, disk: DiskSettings
    ) -> None:
        if disk.capacity <= 0:
            raise ValueError("the disk tier needs a positive max_local_disk_size")
        super().__init__(allocator, max_value)
        self.arena = arena
        self.disk_capacity = disk.capacity
        self.disk = DiskCounters()
        self._disk: OrderedDict[bytes, DiskEntry] = OrderedDict()
        self._disk_bytes = 0
        self._reserved = 0  # bytes of the file being written
        self._queue: deque[Slot] = deque()
        self._doomed: list[str] = []  # files the writer is to delete
        self._work = threading.Condition(self._lock)
        self._stopping = False
        self._flush_until = 0.0
        self._warned: set[int] = set()  # kinds of problems logged (errno), by the writer
        self.files = Directory(disk.path)
        try:
            self._seq = self._rebuild()
        except BaseException:
            self.files.close()
            raise
        self._writer = threading.Thread(target=self._write_loop, name="store-disk", daemon=True)
        self._writer.start()

    def acquire(self, keys: Sequence[bytes], protocol: str = OURS) -> list[Slot | None]:
        """Pins and returns the values present in either tier, promoting disk hits to DRAM."""
        with self._lock:
            found = self._lookup(keys)
            below: dict[int, DiskEntry] = {}
            for i, slot in enumerate(found):
                entry = self._disk.get(keys[i])
                if entry is not None:
                    self._disk.move_to_end(keys[i])
                    if slot is None:
                        below[i] = entry
                elif slot is None:
                    self.disk.misses += 1
            if not below:  # all in DRAM, or nowhere: no second trip through the lock
                self._count_reads(found, protocol)
                return found
        for i, entry in below.items():
            found[i] = self._promote(entry)
        with self._lock:
            self._count_reads(found, protocol)
        return found

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        with self._lock:
            stats["tiers"]["disk"] = {
                "items": len(self._disk),
                "bytes": self._disk_bytes,
                "capacity": self.disk_capacity,
                **vars(self.disk),
                "queued": len(self._queue) + (self._reserved > 0),  # with the one being written
                "path": self.files.path,
            }
        return stats

    def close(self) -> None:
        """Lets the writer finish what is queued (for up to FLUSH_SECONDS), then stops it."""
        with self._work:
            self._stopping = True
            self._flush_until = time.monotonic() + FLUSH_SECONDS
            self._work.notify()
        self._writer.join(timeout=FLUSH_SECONDS + 5)
        if self._writer.is_alive():
            log.warning("store: the disk writer is stuck in a write; leaving it behind")
        self.files.close()

    # -- hooks from StoreIndex (lock held) --------------------------------------------------

    def _committed(self, slot: Slot) -> None:
        self._doom(self._drop_disk(slot.key, stale=True))
        if len(self._queue) >= MAX_QUEUED:
            self.disk.skipped += 1
            return
        self._queue.append(slot)
        self._work.notify()

    def _deleted(self, key: bytes) -> bool:
        entry = self._drop_disk(key, stale=True)
        self._doom(entry)
        return entry is not None

    def _below(self, key: bytes, touch: bool) -> bool:
        if key not in self._disk:
            return False
        if touch:
            self._disk.move_to_end(key)
        return True

    # -- the disk map (lock held) -----------------------------------------------------------

    def _rebuild(self) -> int:
        """Fills the map from the directory's intact files; returns the next sequence number."""
        found, self.disk.dropped = self.files.scan()
        last = 0
        for item in found:
            record = item.record
            last = max(last, record.seq)
            if record.length > self.max_value or record.protocol >= len(PROTOCOLS):
                self.disk.dropped += self.files.remove(record.name)  # never servable here
                continue
            self._disk[record.key] = DiskEntry(record)
            self._disk_bytes += record.size
        for name in self._evict_disk(0):  # the cap may be smaller than last time
            self.files.remove(name)
        return last + 1

    def _drop_disk(self, key: bytes, stale: bool) -> DiskEntry | None:
        entry = self._disk.pop(key, None)
        if entry is not None:
            self._disk_bytes -= entry.record.size
            entry.stale = entry.stale or stale
        return entry

    def _doom(self, entry: DiskEntry | None) -> None:
        if entry is not None:
            self._doomed.append(entry.record.name)
            self._work.notify()

    def _evict_disk(self, size: int, limit: int | None = None) -> list[str]:
        """Evicts LRU files until `size` more bytes fit under `limit` (the cap by default);
        returns their names, for the caller to delete outside the lock."""
        limit = self.disk_capacity if limit is None else limit
        names = []
        while self._disk and self._disk_bytes + self._reserved + size > limit:
            key = next(iter(self._disk))
            entry = self._drop_disk(key, stale=False)
            assert entry is not None
            names.append(entry.record.name)
            self.disk.evictions += 1
        return names

    # -- promotion (a reader's thread) ------------------------------------------------------

    def _promote(self, entry: DiskEntry) -> Slot | None:
        """Reads a disk value into fresh DRAM pages and commits it there, pinned for the
        reader; None if it cannot be served (no room, gone, corrupt, or replaced meanwhile)."""
        record = entry.record
        with self._lock:
            fits = record.length <= self.max_value
            slot = self._take(record.length, PROTOCOLS[record.protocol]) if fits else None
            if slot is None:
                self.disk.misses += 1
                return None
        failure = self._read(record, slot)
        with self._lock:
            if failure is not None:
                self._discard(slot)
                self.disk.misses += 1
                if self._disk.get(record.key) is entry:
                    self._drop_disk(record.key, stale=False)
                if failure == "corrupt":
                    self.disk.errors += 1
                    self._doom(entry)
                return None
            served = self._promoted(entry, slot)
        if served is slot:
            self.files.touch(record)
        return served

    def _read(self, record: Record, slot: Slot) -> str | None:
        """Reads a file into a slot's pages; None when it went well, else what went wrong."""
        self.arena.populate(slot.extents)
        try:
            self.files.read_into(record, [self.arena.view[o : o + n] for o, n in slot.extents])
        except FileNotFoundError:
            return "gone"
        except (CorruptFile, OSError) as exc:
            log.warning("store: dropping disk value %s: %s", record.name, str(exc))
            return "corrupt"
        return None

    def _promoted(self, entry: DiskEntry, slot: Slot) -> Slot | None:
        """Commits a value read from disk, unless a put or another reader got there first
        (lock held); the value the reader gets, pinned."""
        key = entry.record.key
        live = self._index.get(key)
        if live is not None or entry.stale:
            self._discard(slot)
            if live is None:
                self.disk.misses += 1
            else:
                self._pin(live)
            return live
        slot.tag = entry.record.tag
        self._commit(slot, key, entry.record.length)
        self._pin(slot)
        self.disk.hits += 1
        return slot

    # -- the writer thread ------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            with self._work:
                while not (self._queue or self._doomed or self._stopping):
                    self._work.wait()
                doomed, self._doomed = self._doomed, []
                late = self._stopping and time.monotonic() > self._flush_until
                if self._stopping and (late or not self._queue):
                    self.disk.skipped += len(self._queue)
                    self._queue.clear()
                    job = None
                else:
                    job = self._next_write(doomed)
            self._remove(doomed)
            if job is None and self._stopping:
                return
            if job is not None:
                self._finish(job, self._write(job))

    def _next_write(self, doomed: list[str]) -> _Write | None:
        """The next queued value still in DRAM, pinned, with room made for its file (lock
        held); the names of the files evicted for it go to `doomed`."""
        while self._queue:
            slot = self._queue.popleft()
            protocol = PROTOCOLS.index(slot.protocol)
            record = Record(slot.key, slot.length, self._seq, protocol, slot.tag, 0)
            if slot.state is not SlotState.LIVE or record.size > self.disk_capacity:
                self.disk.skipped += 1
                continue
            self._seq += 1
            doomed += self._evict_disk(record.size)
            self._reserved += record.size
            self._pin(slot)
            return _Write(slot, record)
        return None

    def _write(self, job: _Write) -> Record | None:
        """Writes one value's file (no lock held); its record, or None if it failed."""
        views = [self.arena.view[o : o + n] for o, n in job.slot.extents]
        record = job.record._replace(value_hash=value_hash(views))
        for attempt in range(2):
            try:
                self.files.write(record, views)
                return record
            except OSError as exc:
                if exc.errno == errno.ENOSPC and attempt == 0:
                    with self._lock:  # the filesystem is fuller than our cap: make room
                        evicted = self._evict_disk(record.size, self._disk_bytes + self._reserved)
                    self._remove(evicted)
                    if evicted:
                        self._warn_once(-errno.ENOSPC, "the filesystem is full before the cap")
                        continue
                with self._lock:
                    self.disk.errors += 1
                self._warn_once(exc.errno or 0, f"cannot write {record.name}: {exc}")
                return None
        return None

    def _finish(self, job: _Write, written: Record | None) -> None:
        """Indexes a written file, unless its value was replaced or deleted meanwhile."""
        with self._lock:
            self._reserved -= job.record.size
            self._unpin(job.slot)
            if written is None:
                return
            if job.slot.state is not SlotState.LIVE:
                self._doomed.append(written.name)
                return
            self._doom(self._drop_disk(written.key, stale=True))
            self._disk[written.key] = DiskEntry(written)
            self._disk_bytes += written.size
            self.disk.writes += 1

    def _warn_once(self, kind: int, text: str) -> None:
        """Logs the first problem of each kind; the counters tell how often it recurs."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("store: disk tier: %s (logged once; see its errors and evictions)", text)

    def _remove(self, names: Sequence[str]) -> None:
        for name in names:
            self.files.remove(name)
