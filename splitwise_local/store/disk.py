"""The disk tier's files: one value per file, written atomically, read back verified.

A file is a 44-byte header, the key, the protocol's tag (LMCache's fmt, dtype and shape; empty
for ours) and the value. Its name is its sequence number (16 hex digits, `.kv`): the store
numbers every file it writes, so a newer value of a key never reuses an older one's name, and
at start the highest number of a key wins. docs/wire-format.md ("Disk files") has the layout.

Atomic: a file is written as `<seq>.tmp` and renamed to `<seq>.kv` once whole, so a `.kv`
name only ever holds a complete file, and a crash mid-write leaves a `.tmp` that the next start
deletes. Not fsynced: a killed store loses nothing it renamed (the bytes are in the kernel's
page cache, which outlives the process), and what a power cut or kernel crash tears is caught
by the checksums, so the cost of a flush per value (milliseconds on many disks) buys only the
survival of cache entries, which are recomputed when lost. Verified: the header carries an
xxh3-64 of itself (with key and tag) and one of the value; the header is checked at start, the
value on every read, so a torn or corrupt file is dropped and deleted, never served.

The directory is private to the store's user (mode 0700, files 0600: the values are the
store's, behind its token), and locked (`flock` on `.lock`) so two stores never share it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
from collections.abc import Sequence
from typing import NamedTuple

import xxhash

from splitwise_local.store.protocol import MAX_KEY

MAGIC = b"SWKD"
FORMAT = 1  # the file format's version: a file of another version is dropped at start
_HEAD = struct.Struct("<4sHBBHHQQQ")  # magic, format, protocol, tag len, key len, 0, len, seq, hash
_CHECK = struct.Struct("<Q")  # xxh3-64 of the head, key and tag
HEADER = _HEAD.size + _CHECK.size
_NAME = re.compile(r"[0-9a-f]{16}\.kv")
_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC
_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers per preadv / pwritev


class CorruptFile(Exception):
    """A file whose header or value does not match its checksums, or is cut short."""


class Record(NamedTuple):
    """What a file's header says; `seq` names the file."""

    key: bytes
    length: int  # bytes of value
    seq: int
    protocol: int  # index into index.PROTOCOLS: whose client wrote the value
    tag: bytes
    value_hash: int  # xxh3-64 of the value

    @property
    def name(self) -> str:
        return f"{self.seq:016x}.kv"

    @property
    def size(self) -> int:
        """Bytes of the whole file: what counts against the disk tier's cap."""
        return HEADER + len(self.key) + len(self.tag) + self.length

    def header(self) -> bytes:
        head = _HEAD.pack(
            MAGIC, FORMAT, self.protocol, len(self.tag), len(self.key), 0, self.length,
            self.seq, self.value_hash,
        )  # fmt: skip
        body = head + self.key + self.tag
        return body[: _HEAD.size] + _CHECK.pack(xxhash.xxh3_64_intdigest(body)) + body[_HEAD.size :]


def parse_header(data: bytes | bytearray | memoryview) -> Record:
    """The record a file starts with; CorruptFile if the header is not whole and intact."""
    if len(data) < HEADER:
        raise CorruptFile("shorter than a header")
    magic, version, protocol, tag_len, key_len, _, length, seq, value_hash = _HEAD.unpack_from(data)
    if magic != MAGIC or version != FORMAT:
        raise CorruptFile(f"not a version {FORMAT} value file")
    if not 0 < key_len <= MAX_KEY or len(data) < HEADER + key_len + tag_len:
        raise CorruptFile("key or tag cut short")
    key = bytes(data[HEADER : HEADER + key_len])
    tag = bytes(data[HEADER + key_len : HEADER + key_len + tag_len])
    (check,) = _CHECK.unpack_from(data, _HEAD.size)
    if check != xxhash.xxh3_64_intdigest(bytes(data[: _HEAD.size]) + key + tag):
        raise CorruptFile("header checksum mismatch")
    return Record(key, length, seq, protocol, tag, value_hash)


def value_hash(views: Sequence[memoryview]) -> int:
    """The xxh3-64 of a value held in several pieces (the GIL is released while it runs)."""
    digest = xxhash.xxh3_64()
    for view in views:
        digest.update(view)
    return digest.intdigest()


class Found(NamedTuple):
    """A file the start-up scan kept: its record and when it was last used."""

    record: Record
    used_ns: int  # modification time: written, or last promoted


class Directory:
    """The tier's directory: locked for this store, scanned at start, one file per value.
    Not thread-safe for one file (the tier's writer thread writes, readers read)."""

    def __init__(self, path: str) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)
        owner = os.stat(path).st_uid
        if owner != os.geteuid():
            raise PermissionError(f"disk tier {path} belongs to uid {owner}, not to this user")
        os.chmod(path, 0o700)
        self.path = path
        self._lock = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT | _FLAGS, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock)
            raise OSError(errno.EBUSY, f"disk tier {path} is in use by another store") from None

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1

    def scan(self) -> tuple[list[Found], int]:
        """The intact files, least recently used first, and how many were dropped (deleted):
        unfinished `.tmp` writes, torn or corrupt headers, older values of a key."""
        newest: dict[bytes, Found] = {}
        dropped = 0
        with os.scandir(self.path) as entries:
            for entry in entries:
                if entry.name.endswith(".tmp"):
                    dropped += self.remove(entry.name)
                elif _NAME.fullmatch(entry.name):
                    found = self._load(entry)
                    if found is None:
                        dropped += self.remove(entry.name)
                        continue
                    old = newest.get(found.record.key)
                    if old is not None:
                        stale = min(old, found, key=lambda f: f.record.seq)
                        dropped += self.remove(stale.record.name)
                        found = max(old, found, key=lambda f: f.record.seq)
                    newest[found.record.key] = found
        return sorted(newest.values(), key=lambda f: (f.used_ns, f.record.seq)), dropped

    def _load(self, entry: os.DirEntry[str]) -> Found | None:
        try:
            fd = os.open(entry.path, os.O_RDONLY | _FLAGS)
            try:
                info = os.fstat(fd)
                record = parse_header(os.pread(fd, HEADER + MAX_KEY + 255, 0))
            finally:
                os.close(fd)
        except (OSError, CorruptFile):
            return None
        if record.name != entry.name or record.size != info.st_size:
            return None
        return Found(record, info.st_mtime_ns)

    def write(self, record: Record, value: Sequence[memoryview]) -> None:
        """Writes a whole file under a temporary name, then renames it into place."""
        temp = os.path.join(self.path, f"{record.seq:016x}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600)
        try:
            _write_all(fd, [memoryview(record.header()), *value])
        except BaseException:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        os.rename(temp, os.path.join(self.path, record.name))

    def read_into(self, record: Record, value: Sequence[memoryview]) -> None:
        """Reads a file's value into `value` (views as long as the value, in order) and
        checks it; FileNotFoundError if it is gone, CorruptFile if it is not what `record`
        says (cut short, changed, or another file)."""
        head = bytearray(record.size - record.length)
        fd = os.open(os.path.join(self.path, record.name), os.O_RDONLY | _FLAGS)
        try:
            if os.fstat(fd).st_size != record.size:
                raise CorruptFile(f"{record.name} is not {record.size} bytes long")
            if _read_all(fd, [memoryview(head), *value]) != record.size:
                raise CorruptFile(f"{record.name} was cut short while read")
        finally:
            os.close(fd)
        if parse_header(head) != record:
            raise CorruptFile(f"{record.name} holds another value")
        if value_hash(value) != record.value_hash:
            raise CorruptFile(f"{record.name}: value checksum mismatch")

    def touch(self, record: Record) -> None:
        """Marks a file as just used, so the LRU order survives a restart."""
        with contextlib.suppress(OSError):  # deleted meanwhile: its order does not matter
            os.utime(os.path.join(self.path, record.name))

    def remove(self, name: str) -> int:
        """Deletes a file; 1 if it was there, 0 if it was already gone."""
        try:
            os.unlink(os.path.join(self.path, name))
        except FileNotFoundError:
            return 0
        return 1


def _advance(buffers: list[memoryview], done: int) -> None:
    """Drops the first `done` bytes from the buffers (a vectored call may stop mid-buffer)."""
    while buffers and done >= len(buffers[0]):
        done -= len(buffers[0])
        buffers.pop(0)
    if buffers and done:
        buffers[0] = buffers[0][done:]


def _write_all(fd: int, buffers: list[memoryview]) -> None:
    offset = 0
    while buffers:
        written = os.pwritev(fd, buffers[:_IOV_MAX], offset)
        offset += written
        _advance(buffers, written)


def _read_all(fd: int, buffers: list[memoryview]) -> int:
    """Fills the buffers from the file's start; the bytes read (fewer at the end of file)."""
    offset = 0
    while buffers:
        got = os.preadv(fd, buffers[:_IOV_MAX], offset)
        if got == 0:
            break
        offset += got
        _advance(buffers, got)
    return offset
