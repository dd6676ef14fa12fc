"""The Mooncake column of `bench store`: the same values through Mooncake Store, same machine.

What going distributed costs on one host: a local `mooncake_master`, a holder process that
mounts the memory (as the other engine, or a memory node, does in a real deployment) and a
client in this process that mounts none, so every value crosses to another process over
loopback TCP through Mooncake's transfer engine. The baseline is our shared-memory path (what
the engines use on one host), measured in the same interleaved rounds on the same values.
There is no goal: the ratio is the price of a store that spans hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator
from typing import Any

from splitwise_bench.throughput import (
    BATCH_LARGE,
    SIZES,
    MiB,
    best,
    each,
    gbps,
    largest_case_bytes,
)
from splitwise_local.config import MooncakeOptions
from splitwise_local.store.mooncake import MasterAddress, MooncakeBackend
from splitwise_testing.mooncake_child import spawn_master

HOLDER_START_S = 60
LOCAL_BUFFER = 16 * MiB  # unused by the zero-copy path; Mooncake requires one


def _hold_segment(url: str, size: int, ready: Any, stop: Any) -> None:
    """The holder process: mounts `size` bytes into the store until told to stop."""
    options = MooncakeOptions(global_segment_size=size, local_buffer_size=LOCAL_BUFFER)
    with MooncakeBackend(MasterAddress.parse(url), options):
        ready.set()
        stop.wait()


@contextlib.contextmanager
def mooncake_client(segment_bytes: int) -> Iterator[MooncakeBackend]:
    """A client of a fresh local master whose only memory is another process's segment."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    with spawn_master() as master:
        holder = context.Process(
            target=_hold_segment, args=(master.url, segment_bytes, ready, stop), daemon=True
        )
        holder.start()
        try:
            deadline = time.monotonic() + HOLDER_START_S
            while not ready.wait(0.2):
                if not holder.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the Mooncake segment holder did not start ({holder})")
            # A client that only reads and writes mounts nothing (Mooncake allows 0).
            options = MooncakeOptions(local_buffer_size=LOCAL_BUFFER).model_copy(
                update={"global_segment_size": 0}
            )
            with MooncakeBackend(MasterAddress.parse(master.url), options) as client:
                yield client
        finally:
            stop.set()
            holder.join(30)
            if holder.is_alive():
                holder.kill()
                holder.join()


def mooncake_rows(args: argparse.Namespace, shm: Any) -> list[dict[str, Any]]:
    """`bench store` throughput rows for Mooncake, against `shm` (our store's shm client)."""
    rows = []
    # Every size's values stay (a read leases them for 10 s): room for all, below the 90 %
    # at which the master starts evicting.
    with mooncake_client(3 * largest_case_bytes(args.mb) + 64 * MiB) as mooncake:
        for size in SIZES:
            count = max(4, args.mb * MiB // size)
            value = memoryview(os.urandom(size))
            keys = [f"mooncake-{size}-{i}" for i in range(count)]
            batches = [keys[i : i + BATCH_LARGE] for i in range(0, count, BATCH_LARGE)]
            cases = {}
            for path, client in (("mooncake", mooncake), ("shm", shm)):
                cases |= {
                    f"{path} put x1": each(keys, lambda key, c=client, v=value: c.put(key, v)),
                    f"{path} get x1": each(keys, client.get),
                    f"{path} put x{BATCH_LARGE}": each(
                        batches, lambda b, c=client, v=value: c.put_many([(k, v) for k in b])
                    ),
                    f"{path} get x{BATCH_LARGE}": each(batches, client.get_many),
                }
            for action in cases.values():  # warm-up: every destination written once
                action()
            top = best(
                [
                    {name: gbps(action, count * size) for name, action in cases.items()}
                    for _ in range(args.repeats)
                ]
            )
            if mooncake.exists(keys) != len(keys):
                raise RuntimeError("Mooncake evicted values under measurement: gets were misses")
            for op in ("put", "get"):
                for batch in (1, BATCH_LARGE):
                    ours, theirs = top[f"mooncake {op} x{batch}"], top[f"shm {op} x{batch}"]
                    rows.append(
                        {
                            "path": "mooncake",
                            "op": op,
                            "batch": batch,
                            "size_mib": size // MiB,
                            "store_gbps": ours,
                            "baseline": "shm",
                            "baseline_gbps": theirs,
                            "ratio": ours / theirs,
                            "goal": 0.0,  # none: informational
                        }
                    )
    return rows
