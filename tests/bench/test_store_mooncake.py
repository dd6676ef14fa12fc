"""The Mooncake column of `bench store`, run small against real processes."""

from __future__ import annotations

import argparse
import os

from splitwise_bench.store_mooncake import mooncake_rows
from splitwise_bench.throughput import BATCH_LARGE, SIZES, MiB
from splitwise_local.store import open_backend
from splitwise_testing.store_child import spawn


def test_rows_compare_mooncake_with_the_shared_memory_path():
    args = argparse.Namespace(mb=4, repeats=1)
    name = f"mooncake-bench-{os.getpid()}"
    with (
        spawn("--max-size-gb", "0.25", "--shm-name", name) as store,
        open_backend(store.shm_url) as shm,
    ):
        rows = mooncake_rows(args, shm)
    assert [(r["op"], r["batch"], r["size_mib"]) for r in rows] == [
        (op, batch, size // MiB)
        for size in SIZES
        for op in ("put", "get")
        for batch in (1, BATCH_LARGE)
    ]
    for row in rows:
        assert row["path"] == "mooncake" and row["baseline"] == "shm"
        assert row["store_gbps"] > 0 and row["baseline_gbps"] > 0
        assert row["ratio"] == row["store_gbps"] / row["baseline_gbps"]
