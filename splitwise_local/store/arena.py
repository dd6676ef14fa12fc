"""The shared-memory arena every value lives in, and the page allocator that carves it up.

The server holds all values, whichever path they came by, in one region allocated up front,
so its memory is the cap plus a fixed overhead however many values come and go (a bytes object
per value would fragment the heap and grow past the cap). The region is a memfd: it has no name
in /dev/shm, so a killed server leaks nothing; clients on this host receive its file descriptor
over the Unix control socket and map it, and values cross by one memcpy each way.

Values are stored in fixed-size pages, not contiguous ranges: any free pages fit any value, so
eviction never has to find a hole of the right size. A value is a list of extents (runs of
adjacent pages), which stay long because freed runs are reused whole.
"""

from __future__ import annotations

import array
import mmap
import os
from collections.abc import Sequence

_GRANULE = 2 * 1024 * 1024
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; Python's mmap module does not name it

Extent = tuple[int, int]  # (byte offset in the arena, byte length)
Run = tuple[int, int]  # (first page, number of pages)


class SharedArena:
    """One mapping of a memfd; the server creates it, a client attaches to a received fd."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        self._mapped = bytearray(-(-size // _GRANULE))  # granules this process has populated
        self._can_populate = True

    @classmethod
    def create(cls, name: str, size: int, prefault: bool = False) -> SharedArena:
        """A fresh zero-filled region; `prefault` reserves its memory now, failing cleanly here
        rather than with SIGBUS on the first write that finds the host out of memory."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            if prefault:
                os.posix_fallocate(fd, 0, size)
            return cls(fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int) -> SharedArena:
        """Maps a received descriptor; the descriptor is closed (the mapping keeps the memory)."""
        try:
            arena = cls(fd, size)
        finally:
            os.close(fd)
        arena.fd = -1
        return arena

    def resident_bytes(self) -> int:
        """Bytes of the region backed by memory now, written by any process."""
        return os.fstat(self.fd).st_blocks * 512 if self.fd >= 0 else 0

    def populate(self, extents: Sequence[Extent]) -> None:
        """Maps the extents' pages into this process in one call per granule, the first time.

        Touching a page of the mapping for the first time costs a page fault per 4 KiB (writes
        get no fault-around), which would halve the memcpy speed; MADV_POPULATE_WRITE does the
        same work in bulk, and only once per granule, so memory is still taken as it is used.
        """
        if not self._can_populate:
            return
        for offset, length in extents:
            for granule in range(offset // _GRANULE, (offset + max(length, 1) - 1) // _GRANULE + 1):
                if self._mapped[granule]:
                    continue
                start = granule * _GRANULE
                try:
                    self._map.madvise(_MADV_POPULATE_WRITE, start, min(_GRANULE, self.size - start))
                except OSError:  # kernel older than 5.14: plain page faults will do
                    self._can_populate = False
                    return
                self._mapped[granule] = 1

    def write(self, extents: Sequence[Extent], data: bytes | bytearray | memoryview) -> None:
        """Copies `data` into the extents, in order, as far as it goes (a slot may be larger
        than the value): the one memcpy of a shared-memory put."""
        src = memoryview(data).cast("B")
        pos = 0
        for offset, length in extents:
            take = min(length, len(src) - pos)
            if take <= 0:
                break
            self.populate([(offset, take)])
            self.view[offset : offset + take] = src[pos : pos + take]
            pos += take
        if pos < len(src):
            raise ValueError(f"{len(src)} bytes do not fit extents of {pos}")

    def read_into(self, extents: Sequence[Extent], out: memoryview) -> None:
        """Copies the extents, in order, into `out` (the one memcpy of a shared-memory get)."""
        self.populate(extents)
        pos = 0
        for offset, length in extents:
            out[pos : pos + length] = self.view[offset : offset + length]
            pos += length

    def close(self) -> None:
        self.view.release()
        self._map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PageAllocator:
    """Hands out pages of a fixed size; not thread-safe (the store's lock covers it)."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages <= 0:
            raise ValueError("the arena must hold at least one page")
        self.num_pages = num_pages
        self.page_size = page_size
        # A stack (8 bytes a page): the most recently freed pages are reused first, which
        # keeps a value's pages together when it replaces one of its own size. Runs go on in
        # descending order, so they come off ascending: successive allocations are adjacent.
        self._free = array.array("Q", range(num_pages - 1, -1, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, length: int) -> int:
        """At least one page even for an empty value, so the item count is bounded too."""
        return max(1, -(-length // self.page_size))

    def allocate(self, num_pages: int) -> list[Run] | None:
        """`num_pages` pages as runs of adjacent pages, or None if fewer are free."""
        if num_pages > len(self._free):
            return None
        pages = sorted(self._free[len(self._free) - num_pages :])
        del self._free[len(self._free) - num_pages :]
        runs: list[Run] = []
        start = prev = pages[0]
        for page in pages[1:]:
            if page != prev + 1:
                runs.append((start, prev - start + 1))
                start = page
            prev = page
        runs.append((start, prev - start + 1))
        return runs

    def release(self, runs: Sequence[Run]) -> None:
        for first, count in runs:
            self._free.extend(range(first + count - 1, first - 1, -1))

    def extents(self, runs: Sequence[Run], length: int) -> list[Extent]:
        """The byte extents a value of `length` bytes occupies in `runs`."""
        out: list[Extent] = []
        left = length
        for first, count in runs:
            take = min(left, count * self.page_size)
            out.append((first * self.page_size, take))
            left -= take
        return out
