"""The disk tier in one process: spill, promotion, its cap, restart, and files that go bad."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from splitwise_local.store.arena import PageAllocator, SharedArena
from splitwise_local.store.disk import HEADER, Directory, Record, parse_header
from splitwise_local.store.index import LMCACHE, SlotState
from splitwise_local.store.lmcache_protocol import Tag
from splitwise_local.store.tiers import DiskSettings, TieredIndex
from tests.store.helpers import make_value, seed_of

PAGE = 4096
VALUE = 3 * PAGE  # one value: three pages of DRAM, one file of VALUE + its header and key


class Tiered:
    """A TieredIndex over a real arena and directory, with put/get as a session does them."""

    def __init__(self, path: Path, dram_values: int = 4, disk_values: float = 6.5) -> None:
        pages = dram_values * VALUE // PAGE
        self.arena = SharedArena.create("test-disk", pages * PAGE)
        self.path = path
        self.index = TieredIndex(
            PageAllocator(pages, PAGE),
            pages * PAGE,
            self.arena,
            DiskSettings(str(path), int(disk_values * file_size("k00"))),
        )

    def put(
        self, key: str, value: bytes | None = None, protocol: str = "splitwise", settle: bool = True
    ) -> bytes:
        """Stores a value; by default waits until the writer is done with it (the writer's
        pace is not what these tests are about)."""
        value = make_value(key, VALUE) if value is None else value
        slot = self.index.reserve(len(value), protocol)
        self.arena.write(slot.extents, value)
        if protocol == LMCACHE:
            slot.tag = Tag(2, 3, (4, 5, 6, 7)).pack()
        self.index.commit(slot, key.encode(), len(value))
        if settle:
            self.settle()
        return value

    def get(self, key: str) -> bytes | None:
        (slot,) = self.index.acquire([key.encode()])
        if slot is None:
            return None
        try:
            out = bytearray(slot.length)
            self.arena.read_into(slot.extents, memoryview(out))
            return bytes(out)
        finally:
            self.index.release([slot])

    def disk(self) -> dict:
        return self.index.stats()["tiers"]["disk"]

    def settle(self) -> dict:
        """Waits until the writer has written (or skipped) everything queued."""
        wait_for(lambda: self.disk()["queued"] == 0)
        return self.disk()

    def files(self) -> dict[str, int]:
        """Name -> size of the files in the directory now (the writer may delete one meanwhile:
        it is then not there)."""
        found = {}
        for entry in os.scandir(self.path):
            if entry.name != ".lock":
                with contextlib.suppress(FileNotFoundError):
                    found[entry.name] = entry.stat().st_size
        return found

    def file_of(self, key: str) -> Path:
        for name in self.files():
            with open(self.path / name, "rb") as file:
                if parse_header(file.read(HEADER + 64)).key == key.encode():
                    return self.path / name
        raise AssertionError(f"no file holds {key}")

    def close(self) -> None:
        self.index.close()
        self.arena.close()


def file_size(key: str) -> int:
    return Record(key.encode(), VALUE, 1, 0, b"", 0).size


def wait_for(condition: Callable[[], bool], seconds: float = 30) -> None:
    """Polls until `condition` holds; a generous hang guard, not a timing assertion."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[Callable[..., Tiered]]:
    made: list[Tiered] = []

    def make(**kwargs: float) -> Tiered:
        store = Tiered(tmp_path / "disk", **kwargs)  # type: ignore[arg-type]
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def test_values_evicted_from_dram_come_back_from_disk_and_are_promoted(tiered):
    store = tiered(dram_values=4, disk_values=20)
    values = {f"k{i:02}": store.put(f"k{i:02}") for i in range(10)}
    store.settle()
    dram = set(store.index.keys())
    assert dram == {b"k06", b"k07", b"k08", b"k09"}
    assert store.get("k00") == values["k00"]  # from disk
    assert store.index.keys()[-1] == b"k00"  # promoted, most recently used
    stats = store.index.stats()
    assert (stats["hits"], stats["misses"]) == (1, 0)
    assert stats["tiers"]["disk"]["hits"] == 1 and stats["tiers"]["dram"]["misses"] == 1
    assert stats["tiers"]["disk"]["writes"] == 10 and stats["tiers"]["disk"]["items"] == 10
    for key, value in values.items():
        assert store.get(key) == value
    assert store.disk()["writes"] == 10  # promoted values are not written again


def test_exists_sees_disk_resident_keys_and_refreshes_them_unless_told_not_to(tiered):
    store = tiered(dram_values=2, disk_values=3)
    for key in ("a", "b", "c"):
        store.put(key)
    store.settle()
    assert store.index.keys() == [b"b", b"c"]
    assert store.index.exists_prefix([b"a", b"b", b"c", b"x"]) == 3
    store.index.exists_prefix([b"b"], touch=False)  # leaves b where it was on disk
    store.put("d")  # one file must go: the least recently used, now b
    store.settle()
    assert store.index.exists_prefix([b"a"]) == 1 and store.index.exists_prefix([b"c"]) == 1
    store.put("e")
    store.settle()
    assert store.index.exists_prefix([b"b"]) == 0  # gone from both tiers


def test_the_disk_cap_holds_and_least_recently_used_files_go_first(tiered):
    store = tiered(dram_values=2, disk_values=3.5)
    cap = store.disk()["capacity"]
    store.put("k00")
    store.put("k01")
    store.put("k02")
    store.settle()
    assert store.get("k00") is not None  # k00 used: k01 is now the disk's LRU
    for i in range(3, 12):
        store.put(f"k{i:02}")
        store.settle()
        assert sum(store.files().values()) <= cap
        assert store.disk()["bytes"] == sum(store.files().values())
    assert store.disk()["evictions"] > 0 and store.disk()["items"] == 3
    with pytest.raises(AssertionError):
        store.file_of("k01")


def test_a_restart_serves_what_reached_disk_in_its_use_order(tiered, tmp_path):
    first = Tiered(tmp_path / "disk", dram_values=2, disk_values=5.5)
    values = {key: first.put(key) for key in ("a", "b", "c", "d")}
    first.put("t", protocol=LMCACHE)
    first.settle()
    assert first.get("a") == values["a"]  # promoted: its file is now the most recently used
    first.close()
    second = tiered(dram_values=2, disk_values=5.5)
    assert second.disk()["items"] == 5
    (slot,) = second.index.acquire([b"t"], LMCACHE)
    assert slot is not None and Tag.of(slot) == Tag(2, 3, (4, 5, 6, 7))  # LMCache's tag kept
    assert slot.protocol == LMCACHE
    second.index.release([slot])
    second.put("e")  # the disk is full: its least recently used file goes, b (not a)
    second.settle()
    assert second.get("b") is None
    for key in ("a", "c", "d"):
        assert second.get(key) == values[key]


def test_torn_unfinished_and_outdated_files_are_dropped_at_start(tmp_path):
    store = Tiered(tmp_path / "disk", dram_values=2, disk_values=10)
    for key in ("whole", "cut", "flipped", "old"):
        store.put(key)
    store.settle()
    store.put("old", make_value("new", VALUE))  # the first file of "old" is outdated now
    store.settle()
    paths = {key: store.file_of(key) for key in ("whole", "cut", "flipped", "old")}
    store.index.close()
    store.arena.close()
    with open(paths["cut"], "r+b") as file:
        file.truncate(file.seek(0, os.SEEK_END) - 1)
    with open(paths["flipped"], "r+b") as file:
        file.seek(30)  # in the header
        byte = file.read(1)
        file.seek(30)
        file.write(bytes([byte[0] ^ 1]))
    (tmp_path / "disk" / "00000000000000ff.tmp").write_bytes(b"a crash mid-write")
    seq = int(paths["old"].stem, 16) - 1  # the name of the first file of "old", deleted
    old = Record(b"old", VALUE, seq, 0, b"", 0)  # as if that deletion had not happened
    outdated = tmp_path / "disk" / old.name
    assert not outdated.exists()
    outdated.write_bytes(old.header() + make_value("older", VALUE))
    again = Tiered(tmp_path / "disk", dram_values=2, disk_values=10)
    try:
        disk = again.disk()
        assert disk["dropped"] == 4 and disk["items"] == 2
        assert not outdated.exists() and not (tmp_path / "disk" / "00000000000000ff.tmp").exists()
        assert again.get("cut") is None and again.get("flipped") is None
        assert seed_of(again.get("old")) == "new" and seed_of(again.get("whole")) == "whole"
        assert len(again.files()) == 2
    finally:
        again.close()


def test_a_corrupt_value_is_a_counted_miss_and_its_file_is_deleted(tiered):
    store = tiered(dram_values=2, disk_values=5)
    for key in ("a", "b", "c"):
        store.put(key)
    store.settle()
    path = store.file_of("a")
    with open(path, "r+b") as file:
        file.seek(-100, os.SEEK_END)  # in the value
        file.write(b"\0" * 8)
    assert store.index.exists_prefix([b"a"]) == 1  # the header still looks fine
    assert store.get("a") is None
    assert store.disk()["errors"] == 1 and store.disk()["misses"] == 1
    wait_for(lambda: not path.exists())
    assert store.index.exists_prefix([b"a"]) == 0
    assert store.get("b") is not None  # the others are unharmed


def test_a_file_deleted_underneath_is_a_plain_miss(tiered):
    store = tiered(dram_values=2, disk_values=5)
    for key in ("a", "b", "c"):
        store.put(key)
    store.settle()
    store.file_of("a").unlink()
    assert store.get("a") is None
    disk = store.disk()
    assert disk["errors"] == 0 and disk["misses"] == 1 and disk["items"] == 2
    assert store.index.exists_prefix([b"a"]) == 0
    assert store.index.stats()["pending"] == 0  # the pages reserved for it went back


def test_a_replaced_or_deleted_key_never_comes_back_from_disk(tiered):
    store = tiered(dram_values=2, disk_values=5)
    store.put("k", make_value("v1", VALUE))
    store.settle()
    store.put("k", make_value("v2", VALUE))
    store.put("x")
    store.put("y")  # k (v2) leaves DRAM: its own file, never v1's, is what comes back
    store.settle()
    assert seed_of(store.get("k")) == "v2"
    assert len(store.files()) == 3  # v1's file was deleted
    assert store.index.delete(b"x") and store.get("x") is None
    assert store.index.delete(b"k")  # in DRAM and on disk: gone from both
    wait_for(lambda: len(store.files()) == 1)
    assert store.get("k") is None and not store.index.delete(b"k")


def stall_writer(store) -> tuple[threading.Event, threading.Event]:
    """Holds the disk writer inside its next write (a disk that stopped answering): the first
    event is set once it is held, the second lets it go on."""
    stalled, release = threading.Event(), threading.Event()
    write = store.index.files.write

    def stalled_write(record, value):
        stalled.set()
        release.wait(60)
        write(record, value)

    store.index.files.write = stalled_write
    return stalled, release


def test_dram_eviction_never_waits_for_a_stalled_disk(tiered):
    """The writer is held inside its first write (a disk that stopped answering): puts go on,
    DRAM evicts what the writer never reached (counted as skipped), nothing waits."""
    store = tiered(dram_values=3, disk_values=20)
    stalled, release = stall_writer(store)
    store.put("first", settle=False)
    assert stalled.wait(30)
    values = {f"k{i:02}": store.put(f"k{i:02}", settle=False) for i in range(12)}  # 4x DRAM
    assert store.index.stats()["tiers"]["dram"]["evictions"] >= 10
    release.set()
    disk = store.settle()
    assert disk["skipped"] >= 9 and disk["writes"] == 1 + 12 - disk["skipped"]
    assert store.get("first") is not None
    for key, value in values.items():
        assert store.get(key) in (value, None)  # never torn, never another value
    assert store.get("k11") == values["k11"]


def test_a_value_being_written_stays_pinned_and_a_replaced_one_is_not_indexed(tiered):
    store = tiered(dram_values=2, disk_values=5)
    stalled, release = stall_writer(store)
    store.put("k", make_value("v1", VALUE), settle=False)
    assert stalled.wait(30)
    (old,) = [s for s in store.index._index.values() if s.key == b"k"]
    assert old.pins == 1  # the writer's pin: eviction skips it
    store.put("k", make_value("v2", VALUE), settle=False)  # replaced while being written
    assert old.state is SlotState.DROPPED
    release.set()
    store.settle()
    store.put("x")
    store.put("y")
    store.settle()
    assert seed_of(store.get("k")) == "v2"
    assert len(store.files()) == 3  # v1's finished file was deleted, not indexed


def test_the_directory_is_private_and_one_store_at_a_time(tiered, tmp_path):
    store = tiered()
    store.put("a")
    store.settle()
    mode = stat.S_IMODE(os.stat(tmp_path / "disk").st_mode)
    assert mode == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "disk").iterdir()} == {0o600}
    with pytest.raises(OSError, match="in use by another store"):
        Directory(str(tmp_path / "disk"))


def test_a_replacement_that_left_dram_unwritten_is_a_miss_not_the_old_value(tiered):
    """The old file must not stand in for a newer value the disk never got."""
    store = tiered(dram_values=2, disk_values=10)
    store.put("k", make_value("v1", VALUE))
    stalled, release = stall_writer(store)
    store.put("s", settle=False)
    assert stalled.wait(30)
    store.put("k", make_value("v2", VALUE), settle=False)  # queued behind s
    for key in ("x", "y", "z"):
        store.put(key, settle=False)  # k (v2) leaves DRAM before the writer reaches it
    assert store.get("k") is None and store.index.exists_prefix([b"k"]) == 0
    release.set()
    store.settle()
    assert store.get("k") is None


def test_a_promotion_that_read_a_file_replaced_meanwhile_is_dropped(tiered):
    """A reader is inside the old file while a put replaces the key and the new value leaves
    DRAM: the old bytes it read are not committed."""
    store = tiered(dram_values=2, disk_values=10)
    store.put("k", make_value("v1", VALUE))
    store.put("a")
    store.put("b")  # k is on disk only
    reading, release = threading.Event(), threading.Event()
    read_into = store.index.files.read_into

    def stalled_read(record, value):
        read_into(record, value)
        reading.set()
        release.wait(60)

    store.index.files.read_into = stalled_read
    got: list[bytes | None] = []
    reader = threading.Thread(target=lambda: got.append(store.get("k")))
    reader.start()
    assert reading.wait(30)
    store.index.files.read_into = read_into
    store.put("k", make_value("v2", VALUE))
    store.put("c", settle=False)
    store.put("d", settle=False)  # v2 leaves DRAM (written to disk first: settled above)
    release.set()
    reader.join(30)
    assert got == [None]
    assert seed_of(store.get("k")) == "v2"


def test_vectored_io_that_stops_mid_buffer_still_moves_every_byte(tmp_path: Path, monkeypatch):
    """preadv/pwritev may move fewer bytes than asked, ending inside a buffer: the rest follows."""
    from splitwise_local.store import disk

    real_write, real_read = os.pwritev, os.preadv

    calls = iter(range(100))  # a loop that stops advancing fails here instead of spinning

    def short(call: Callable[..., int]) -> Callable[..., int]:
        def at_most_five(fd: int, buffers: list[memoryview], offset: int) -> int:
            next(calls)
            head = memoryview(buffers[0])[:5]
            return call(fd, [head], offset)

        return at_most_five

    monkeypatch.setattr(os, "pwritev", short(real_write))
    monkeypatch.setattr(os, "preadv", short(real_read))
    parts = [b"abcdefgh", b"ij", b"klmnopqrstuvw"]
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        disk._write_all(fd, [memoryview(p) for p in parts])
        into = [memoryview(bytearray(len(p))) for p in parts]
        assert disk._read_all(fd, list(into)) == sum(map(len, parts))
    finally:
        os.close(fd)
    assert [bytes(m) for m in into] == parts
    assert (tmp_path / "f").read_bytes() == b"".join(parts)
