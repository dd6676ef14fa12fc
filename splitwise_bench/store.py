"""`bench store`: the KV store's throughput and latency against baselines measured in the run.

- TCP path: put and get of 1 MiB and 16 MiB values against a raw socket that moves the same
  bytes over loopback (length prefix, one-byte acknowledgement, buffers allocated once).
  Goal: at least 0.7 of the baseline.
- Shared-memory path: put and get against a plain memcpy of the same bytes. Goal: 0.5.
  Also 8 values per put_many / get_many, as the connector moves a prompt's chunks. The
  headline ratios (JSON `ratios`) are the one-value-per-call rows, the worse of the sizes.
- Small values: 4 KiB gets, one per call and 64 per call, on both paths: ops/s, p50, p99.
- Fill past capacity: a store's RSS after four times its capacity went through it.
- LMCache's own server against our store, both through LMCache's protocol and client
  (store_lmcache.py). Goal: 1.5x on 16 MiB puts and gets; RSS flat where LMCache's grows.
- With `--disk`, only the disk tier instead (store_disk.py): gets served from disk against a
  plain read of the same files, DRAM hits with the tier against without it.

Each throughput is the best of `--repeats` interleaved rounds (store and baseline alternate,
so a busy neighbour slows both alike); warm-up rounds run first, so every page of the arena is
already mapped and the numbers are the steady state, not first-touch page faults.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from splitwise_bench import store_disk
from splitwise_bench.throughput import (
    BATCH_LARGE,
    SIZES,
    MiB,
    SocketBaseline,
    best,
    each,
    gbps,
    largest_case_bytes,
)

SMALL = 4096
BATCH = 64  # keys per get_many in the small-value run
TCP_GOAL = 0.7
SHM_GOAL = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mb", type=int, default=128, help="MiB moved per measurement")
    parser.add_argument("--repeats", type=int, default=10, help="rounds; the best one counts")
    parser.add_argument("--small-ops", type=int, default=3000, help="4 KiB gets per mode")
    parser.add_argument("--fill-cap-mb", type=int, default=256, help="capacity in the fill run")
    store_disk.add_arguments(parser)


def _copy(target: memoryview, value: memoryview) -> None:
    target[:] = value


def _warm_up(tcp: Any, shm: Any) -> None:
    """Writes the whole arena through both paths once, so both processes have every page
    mapped and the measurements see the steady state rather than first-touch page faults."""
    value = memoryview(bytearray(max(SIZES)))
    for client in (tcp, shm):
        for i in range(tcp.stats()["capacity"] // len(value)):
            client.put(f"warm-{i}", value)


# Each measured path and op, beside the baseline it is judged against.
PAIRS = [
    ("tcp", "put", 1, "socket put"),
    ("tcp", "get", 1, "socket get"),
    ("shm", "put", 1, "memcpy"),
    ("shm", "get", 1, "memcpy"),
    ("shm", "put", BATCH_LARGE, "memcpy"),
    ("shm", "get", BATCH_LARGE, "memcpy"),
]


def _rows(top: dict[str, float], size: int) -> list[dict[str, Any]]:
    """One row per pair: the store's best GB/s, its baseline's, and their ratio."""
    rows = []
    for path, op, batch, base in PAIRS:
        store_gbps = top[f"{path} {op}" + (f" x{batch}" if batch > 1 else "")]
        rows.append(
            {
                "path": path,
                "op": op,
                "batch": batch,
                "size_mib": size // MiB,
                "store_gbps": store_gbps,
                "baseline": base.split()[0],
                "baseline_gbps": top[base],
                "ratio": store_gbps / top[base],
                "goal": TCP_GOAL if path == "tcp" else SHM_GOAL,
            }
        )
    return rows


def _throughput(args: argparse.Namespace, tcp: Any, shm: Any) -> list[dict[str, Any]]:
    _warm_up(tcp, shm)
    baseline = SocketBaseline()
    rows = []
    try:
        for size in SIZES:
            count = max(4, args.mb * MiB // size)
            value = memoryview(os.urandom(size))
            keys = [f"bench-{size}-{i}" for i in range(count)]
            # The memcpy baseline writes distinct destinations, as the store writes distinct
            # pages: copying into one buffer again and again would measure the CPU cache.
            region = memoryview(bytearray(count * size))
            targets = {key: region[i * size : (i + 1) * size] for i, key in enumerate(keys)}
            batches = [keys[i : i + BATCH_LARGE] for i in range(0, count, BATCH_LARGE)]

            cases: dict[str, Callable[[], None]] = {
                "tcp put": each(keys, lambda key, v=value: tcp.put(key, v)),
                "socket put": each(keys, lambda _, v=value: baseline.put(v)),
                "tcp get": each(keys, tcp.get),
                "socket get": each(keys, lambda _, n=size: baseline.get(n)),
                "shm put": each(keys, lambda key, v=value: shm.put(key, v)),
                "shm get": each(keys, shm.get),
                f"shm put x{BATCH_LARGE}": each(
                    batches, lambda batch, v=value: shm.put_many([(key, v) for key in batch])
                ),
                f"shm get x{BATCH_LARGE}": each(batches, shm.get_many),
                "memcpy": each(keys, lambda key, v=value, t=targets: _copy(t[key], v)),
            }
            for action in cases.values():  # warm-up: every destination written once
                action()
            rounds = [
                {name: gbps(action, count * size) for name, action in cases.items()}
                for _ in range(args.repeats)
            ]
            rows += _rows(best(rounds), size)
    finally:
        baseline.close()
    return rows


def _each_call(call: Callable[[Any], Any], arguments: Sequence[Any]) -> Callable[[], None]:
    """A callable making one call per invocation, cycling through `arguments`."""
    cycle = itertools.cycle(arguments)
    return lambda: call(next(cycle))


def _latencies(call: Callable[[], Any], calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def _small(args: argparse.Namespace, tcp: Any, shm: Any) -> list[dict[str, Any]]:
    import numpy as np

    keys = [f"small-{i}" for i in range(1024)]
    tcp.put_many([(key, os.urandom(SMALL)) for key in keys])
    rows = []
    for path, client in (("tcp", tcp), ("shm", shm)):
        for mode, per_call in (("single", 1), (f"batch of {BATCH}", BATCH)):
            calls = max(10, args.small_ops // per_call)
            batches = [keys[i : i + per_call] for i in range(0, len(keys), per_call)]
            call = _each_call(client.get_many, batches)
            _latencies(call, calls // 10)  # warm-up
            times = np.array(_latencies(call, calls))
            rows.append(
                {
                    "path": path,
                    "mode": mode,
                    "ops_per_s": calls * per_call / times.sum(),
                    "p50_us": float(np.percentile(times, 50) * 1e6),
                    "p99_us": float(np.percentile(times, 99) * 1e6),
                }
            )
    return rows


def _fill(args: argparse.Namespace, shm_name: str) -> dict[str, Any]:
    import psutil

    from splitwise_local.store import open_backend
    from splitwise_testing.store_child import spawn

    cap = args.fill_cap_mb * MiB
    value = os.urandom(MiB)
    with spawn("--max-size-gb", str(cap / 1024**3), "--shm-name", shm_name) as store:
        with open_backend(store.tcp_url) as tcp, open_backend(store.shm_url) as shm:
            for i in range(4 * args.fill_cap_mb):
                (tcp, shm)[i % 2].put(f"fill-{i}", value)
            stats = tcp.stats()
        rss = psutil.Process(store.process.pid).memory_info().rss
    limit = cap * 1.1 + 100 * MiB
    return {
        "capacity": cap,
        "written": 4 * cap,
        "rss": rss,
        "rss_limit": int(limit),
        "rss_vs_cap": rss / cap,
        "evictions": stats["evictions"],
        "items": stats["items"],
        "ok": rss <= limit,
    }


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every case, in order: throughput, Mooncake's column, small gets, filling past capacity,
    LMCache's server."""
    from splitwise_bench import store_lmcache, store_mooncake
    from splitwise_local.progress import Progress
    from splitwise_local.store import open_backend
    from splitwise_testing.store_child import spawn

    name = f"bench-{os.getpid()}"
    # A case's values twice over (old and new), and spare.
    capacity_gb = 3 * largest_case_bytes(args.mb) / 1024**3
    with Progress(total=5, desc="bench store", unit="step") as bar:
        with (
            spawn("--max-size-gb", str(capacity_gb), "--shm-name", name) as store,
            open_backend(store.tcp_url) as tcp,
            open_backend(store.shm_url) as shm,
        ):
            throughput = _throughput(args, tcp, shm)
            bar.update()
            throughput += store_mooncake.mooncake_rows(args, shm)
            bar.update()
            small = _small(args, tcp, shm)
            bar.update()
        fill = _fill(args, f"{name}-fill")
        bar.update()
        lmcache = store_lmcache.measure(args)
        bar.update()
    return {"throughput": throughput, "small": small, "fill": fill, "lmcache": lmcache}


def _print(found: dict[str, Any]) -> None:
    from splitwise_bench import report, store_lmcache

    fill = found["fill"]
    report.print_table(
        "Throughput (GB/s, best of rounds; baseline measured in the same run)",
        ["path", "op", "batch", "size", "store", "baseline", "base GB/s", "ratio", "goal", "ok"],
        [
            [
                *(r["path"], r["op"], r["batch"], f"{r['size_mib']} MiB", r["store_gbps"]),
                r["baseline"],
                *(r["baseline_gbps"], r["ratio"], r["goal"], r["ratio"] >= r["goal"]),
            ]
            for r in found["throughput"]
        ],
    )
    report.print_table(
        f"{SMALL // 1024} KiB gets",
        ["path", "mode", "ops/s", "p50 us", "p99 us"],
        [[r["path"], r["mode"], r["ops_per_s"], r["p50_us"], r["p99_us"]] for r in found["small"]],
    )
    report.print_table(
        "Fill past capacity (4x the capacity written, 1 MiB values, both paths)",
        ["capacity MiB", "RSS MiB", "limit MiB", "RSS/cap", "evictions", "ok"],
        [
            [
                *(fill["capacity"] // MiB, fill["rss"] / MiB, fill["rss_limit"] / MiB),
                *(fill["rss_vs_cap"], fill["evictions"], fill["ok"]),
            ]
        ],
    )
    store_lmcache.print_tables(found["lmcache"])


def _ratios(found: dict[str, Any]) -> dict[str, float]:
    """The headline per path and op is one value per call, the worse of the two sizes."""
    throughput = found["throughput"]

    def worst(path: str, op: str) -> float:
        rows = [r for r in throughput if (r["path"], r["op"], r["batch"]) == (path, op, 1)]
        return min(r["ratio"] for r in rows)

    return {
        "tcp_put_vs_socket": worst("tcp", "put"),
        "tcp_get_vs_socket": worst("tcp", "get"),
        "shm_put_vs_memcpy": worst("shm", "put"),
        "shm_get_vs_memcpy": worst("shm", "get"),
        "rss_vs_cap": found["fill"]["rss_vs_cap"],
        **found["lmcache"]["ratios"],
        **{
            f"{r['path']}_{r['op']}_x{r['batch']}_{r['size_mib']}mib_vs_{r['baseline']}": r["ratio"]
            for r in throughput
        },
    }


def run(args: argparse.Namespace) -> int:
    from splitwise_bench import report

    if args.disk:
        return store_disk.run(args)
    found = _measure(args)
    _print(found)
    fill, lmcache = found["fill"], found["lmcache"]
    report.write_json(
        args.json,
        {
            "benchmark": "store",
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "extra")},
            "ratios": _ratios(found),
            "goals": {
                "tcp_vs_socket_min": TCP_GOAL,
                "shm_vs_memcpy_min": SHM_GOAL,
                "rss_vs_cap_max": fill["rss_limit"] / fill["capacity"],
                **lmcache["goals"],
            },
            "throughput": found["throughput"],
            "small_values": found["small"],
            "fill": fill,
            "lmcache": {"throughput": lmcache["throughput"], "fill": lmcache["fill"]},
        },
    )
    return 0
