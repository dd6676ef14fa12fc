"""`bench store --disk`: the store's disk tier against a plain read of the same files, and
DRAM hits with the tier against without it, measured in one run.

- Disk gets: 1 and 16 MiB values that only the disk holds, read through the shared-memory
  client (what the engines use) and over TCP, against a plain sequential read (`preadv` into a
  buffer allocated once) of as many files of the same size in the same directory. DRAM holds a
  quarter of the values and they are read in least recently used order, so every get misses
  DRAM and is promoted from its file. Both cold: before every round each file of both sides is
  flushed (`fdatasync`) and dropped from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`,
  which needs no privileges and touches no one else's cache), so both read the device with the
  kernel's usual readahead. Goal: 0.5 of the plain read. The same with the page cache warm
  (nothing dropped) is reported too: there the ratio is the store's own overhead.
- DRAM hits: gets of values DRAM holds (1 and 16 MiB, shared memory and TCP), from a store with
  the tier and one without, alternating call by call (a neighbour's load on this shared host
  falls on both alike), `3 x --repeats` times; each key's fastest get counts, so one disturbed
  call does not spoil a round. Goal: within 5% (ratio at least 0.95). A second store without
  the tier is measured the same way beside them (`alike_ratio`): how far two stores alike
  differ on this host, the comparison's noise floor.
- Puts with the tier and without (its writer thread competes for the cores): reported.

Each other number is the best of `--repeats` rounds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from splitwise_bench import report
from splitwise_bench.throughput import SIZES, MiB, best, each, gbps
from splitwise_local.store import open_backend
from splitwise_local.store.backend import KVBackend
from splitwise_testing.store_child import SpawnedStore, spawn

DISK_GOAL = 0.5  # of a plain read of the same files, both cold
DRAM_GOAL = 0.95  # DRAM hits with the tier against without it
OPS = ("get", "put")
GiB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--disk", action="store_true", help="benchmark the disk tier instead (writes its own JSON)"
    )
    parser.add_argument(
        "--disk-dir", help="where the disk tier and the plain files go (default: the temp dir)"
    )
    parser.add_argument("--disk-mb", type=int, default=256, help="MiB of values per size")


def _drop_cache(directory: Path) -> None:
    """Flushes every file in `directory` and drops it from the page cache."""
    for path in directory.iterdir():
        if path.is_file() and path.suffix in (".kv", ".bin"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _plain_reader(paths: list[Path], size: int) -> Callable[[], None]:
    """Reads each file whole into one buffer, as a program that reads a file would."""
    buffer = memoryview(bytearray(size))

    def read() -> None:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                done = 0
                while done < size:
                    done += os.preadv(fd, [buffer[done:]], done)
            finally:
                os.close(fd)

    return read


def _spawn(name: str, dram_mb: int, tier: Path | None, disk_gb: float) -> Any:
    """A store child with `dram_mb` of DRAM and, with `tier`, a disk tier there."""
    args = ["--max-size-gb", str(dram_mb / 1024), "--shm-name", f"bench-{name}-{os.getpid()}"]
    if tier is not None:
        args += ["--local-disk", str(tier), "--max-disk-gb", str(disk_gb)]
    return spawn(*args)


def _settle(client: KVBackend) -> None:
    """Waits until the disk writer has written everything queued (a hang guard of 10 min),
    then until the kernel has flushed it (`sync`), so no write is in flight while the next
    case is measured."""
    deadline = time.monotonic() + 600
    while client.stats()["tiers"]["disk"]["queued"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the disk writer never caught up")
        time.sleep(0.01)
    os.sync()


def _getter(client: KVBackend, size: int) -> Callable[[str], None]:
    """A get that must find its value whole: a miss would flatter the store."""

    def get(key: str) -> None:
        value = client.get(key)
        if value is None or len(value) != size:
            raise RuntimeError(f"the store did not serve {key}")

    return get


def _disk_rows(args: argparse.Namespace, root: Path, tiered: SpawnedStore) -> list[dict[str, Any]]:
    rows = []
    with open_backend(tiered.shm_url) as shm, open_backend(tiered.tcp_url) as tcp:
        for size in SIZES:
            count = max(8, args.disk_mb * MiB // size)
            keys = [f"disk-{size}-{i}" for i in range(count)]
            value = os.urandom(size)
            plain = [root / f"plain-{size}-{i}.bin" for i in range(count)]
            for key, path in zip(keys, plain, strict=True):
                shm.put(key, value)
                _settle(shm)  # none skipped: every value reaches its file
                path.write_bytes(value)
            cases = {
                "shm get": each(keys, _getter(shm, size)),
                "tcp get": each(keys, _getter(tcp, size)),
                "plain read": _plain_reader(plain, size),
            }
            for warm in (False, True):
                rounds = []
                for _ in range(args.repeats):
                    numbers = {}
                    for name, action in cases.items():
                        if not warm:
                            _drop_cache(root / "tier")
                            _drop_cache(root)
                        numbers[name] = gbps(action, count * size)
                    rounds.append(numbers)
                top = best(rounds)
                rows += [_disk_row(path_name, size, warm, top) for path_name in ("shm", "tcp")]
            for path in plain:
                path.unlink()
    return rows


def _disk_row(path: str, size: int, warm: bool, top: dict[str, float]) -> dict[str, Any]:
    store = top[f"{path} get"]
    return {
        "path": path,
        "size_mib": size // MiB,
        "cache": "warm" if warm else "cold",
        "store_gbps": store,
        "plain_read_gbps": top["plain read"],
        "ratio": store / top["plain read"],
        "goal": None if warm else DISK_GOAL,
    }


def _timed_gets(stores: list[KVBackend], keys: list[str], size: int) -> list[list[float]]:
    """Gets of every key from each store in turn, call by call (the first store rotating), so
    a neighbour's load falls on all alike; each store's seconds per key."""
    spent: list[list[float]] = [[] for _ in stores]
    gets = [_getter(client, size) for client in stores]
    for i, key in enumerate(keys):
        for turn in range(len(stores)):
            side = (i + turn) % len(stores)
            start = time.perf_counter()
            gets[side](key)
            spent[side].append(time.perf_counter() - start)
    return spent


def _puts(
    clients: dict[tuple[str, str], KVBackend], keys: list[str], value: bytes, flip: bool
) -> dict[str, float]:
    """One round of puts, a case per store and path (the writer idle after each): GB/s."""
    numbers = {}
    order = list(clients.items())
    for (which, path), client in order[::-1] if flip else order:
        action = each(keys, lambda key, c=client: c.put(key, value))
        numbers[f"{which} {path} put"] = gbps(action, len(keys) * len(value))
        _settle(clients[("tier", "shm")])
    return numbers


def _gets(
    clients: dict[tuple[str, str], KVBackend], keys: list[str], size: int, rounds: int
) -> dict[str, float]:
    """Every store's gets interleaved, `rounds` times; GB/s from each key's fastest get."""
    fastest: dict[str, list[float]] = {}
    for _ in range(rounds):
        for path in ("shm", "tcp"):
            names = [which for which, on in clients if on == path]
            timed = _timed_gets([clients[(which, path)] for which in names], keys, size)
            for which, seconds in zip(names, timed, strict=True):
                kept = fastest.setdefault(f"{which} {path} get", seconds)
                kept[:] = map(min, kept, seconds)
    return {name: len(keys) * size / sum(times) / 1e9 for name, times in fastest.items()}


def _dram_rows(args: argparse.Namespace, stores: dict[str, SpawnedStore]) -> list[dict]:
    """DRAM hits and puts with the tier and without; `again`, a second store without the tier,
    tells how far two stores alike differ here (the noise floor of the comparison)."""
    rows = []
    clients = {
        (which, path): open_backend(getattr(store, f"{path}_url"))
        for which, store in stores.items()
        for path in ("shm", "tcp")
    }
    try:
        for size in SIZES:
            count = max(4, args.mb * MiB // size)
            value = os.urandom(size)
            keys = [f"hit-{size}-{i}" for i in range(count)]
            _puts(clients, keys, value, False)  # warm-up: values stored, pages mapped
            top = best([_puts(clients, keys, value, n % 2 == 1) for n in range(args.repeats)])
            top |= _gets(clients, keys, size, 3 * args.repeats)
            rows += [_dram_row(path, op, size, top) for path in ("shm", "tcp") for op in OPS]
    finally:
        for client in clients.values():
            client.close()
    return rows


def _dram_row(path: str, op: str, size: int, top: dict[str, float]) -> dict[str, Any]:
    tier, dram, again = (top[f"{which} {path} {op}"] for which in ("tier", "dram", "again"))
    return {
        "path": path,
        "op": op,
        "size_mib": size // MiB,
        "with_disk_gbps": tier,
        "dram_only_gbps": dram,
        "ratio": tier / dram,
        "goal": DRAM_GOAL if op == "get" else None,
        "alike_ratio": again / dram,  # two stores without the tier: the comparison's noise
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both measurements. For DRAM hits both stores hold every value; for disk gets DRAM
    holds a quarter of each size's values and the disk all of them."""
    dram_mb = 3 * args.mb  # a case's values twice over (old and new), and spare
    disk_gb = 2.5 * args.disk_mb / 1024
    # Room for four of the largest values (a leased one, a client's spare slot, promotions),
    # and at most half of the values, so that reading them in order misses DRAM every time.
    below_mb = max(4 * max(SIZES) // MiB, args.disk_mb // 4)
    if args.disk_mb < 2 * below_mb:
        raise ValueError(f"--disk-mb must be at least {2 * below_mb}")
    with tempfile.TemporaryDirectory(dir=args.disk_dir, prefix="splitwise-disk-") as name:
        root = Path(name)
        with (
            _spawn("tier", dram_mb, root / "hits", disk_gb) as tiered,
            _spawn("dram", dram_mb, None, 0) as plain,
            _spawn("again", dram_mb, None, 0) as again,
        ):
            dram = _dram_rows(args, {"tier": tiered, "dram": plain, "again": again})
        with _spawn("disk", below_mb, root / "tier", disk_gb) as tiered:
            disk = _disk_rows(args, root, tiered)
            with open_backend(tiered.tcp_url) as client:
                tiers = client.stats()["tiers"]
    return {"dram": dram, "disk": disk, "tiers_after_disk_gets": tiers}


def _judged(row: dict[str, Any]) -> list[Any]:
    """A row's ratio, goal and whether it meets it (no goal: reported only)."""
    goal = row["goal"]
    return [row["ratio"], goal or "-", goal is None or row["ratio"] >= goal]


def _print(results: dict[str, Any]) -> None:
    report.print_table(
        "Gets served from disk (GB/s, best of rounds) against a plain read of the same files",
        ["path", "size", "page cache", "store", "plain read", "ratio", "goal", "ok"],
        [
            [r["path"], f"{r['size_mib']} MiB", r["cache"], r["store_gbps"], r["plain_read_gbps"],
             *_judged(r)]
            for r in results["disk"]
        ],
    )  # fmt: skip
    report.print_table(
        "DRAM hits and puts with the disk tier against without it (GB/s, interleaved); "
        "alike: a second store without it against the first",
        ["path", "op", "size", "with disk", "DRAM only", "alike", "ratio", "goal", "ok"],
        [
            [r["path"], r["op"], f"{r['size_mib']} MiB", r["with_disk_gbps"], r["dram_only_gbps"],
             r["alike_ratio"], *_judged(r)]
            for r in results["dram"]
        ],
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    results = measure(args)
    _print(results)
    cold = [r for r in results["disk"] if r["cache"] == "cold"]
    hits = [r for r in results["dram"] if r["op"] == "get"]
    ratios = {
        "disk_get_vs_plain_read": min(r["ratio"] for r in cold if r["path"] == "shm"),
        "dram_hit_with_disk_vs_without": min(r["ratio"] for r in hits),
        **{
            f"disk_{r['path']}_get_{r['size_mib']}mib_{r['cache']}_vs_plain_read": r["ratio"]
            for r in results["disk"]
        },
        **{
            f"dram_{r['path']}_{r['op']}_{r['size_mib']}mib_with_disk_vs_without": r["ratio"]
            for r in results["dram"]
        },
    }
    report.write_json(
        args.json,
        {
            "benchmark": "store --disk",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "extra")},
            "ratios": ratios,
            "goals": {
                "disk_get_vs_plain_read_min": DISK_GOAL,
                "dram_hit_with_disk_vs_without_min": DRAM_GOAL,
            },
            **results,
        },
    )
    return 0
