"""`bench store` end to end, small: every comparison it reports is measured and written out."""

from __future__ import annotations

from splitwise_bench.throughput import BATCH_LARGE, SIZES, MiB
from splitwise_testing.bench_run import positive, run_bench

SHORT = ["--mb", "4", "--repeats", "1", "--small-ops", "50", "--fill-cap-mb", "16"]


def test_bench_store_short_run_measures_every_case(tmp_path) -> None:
    result = run_bench("store", SHORT, tmp_path / "store.json", timeout_s=900)

    sizes = {size // MiB for size in SIZES}
    ours = {("tcp", op, 1, size) for op in ("put", "get") for size in sizes} | {
        ("shm", op, batch, size)
        for op in ("put", "get")
        for batch in (1, BATCH_LARGE)
        for size in sizes
    }
    mooncake = {
        ("mooncake", op, batch, size)
        for op in ("put", "get")
        for batch in (1, BATCH_LARGE)
        for size in sizes
    }
    rows = result["throughput"]
    assert {(r["path"], r["op"], r["batch"], r["size_mib"]) for r in rows} == ours | mooncake
    assert len(rows) == len(ours | mooncake)
    for row in rows:
        assert positive(row["store_gbps"]) and positive(row["baseline_gbps"]), row
        assert positive(row["ratio"]), row

    small = result["small_values"]
    assert {(r["path"], r["mode"]) for r in small} == {
        (path, mode) for path in ("tcp", "shm") for mode in ("single", "batch of 64")
    }
    assert all(positive(r[key]) for r in small for key in ("ops_per_s", "p50_us", "p99_us"))

    fill = result["fill"]
    assert fill["capacity"] == 16 * MiB and fill["written"] == 4 * fill["capacity"]
    assert positive(fill["rss"]) and fill["evictions"] > 0

    lmcache = result["lmcache"]
    assert {(r["op"], r["size_mib"]) for r in lmcache["throughput"]} == {
        (op, size) for op in ("put", "get") for size in sizes
    }
    assert all(positive(r["ratio"]) for r in lmcache["throughput"])
    assert len(lmcache["fill"]["samples"]) == 4

    for name in ("tcp_put_vs_socket", "tcp_get_vs_socket", "shm_put_vs_memcpy",
                 "shm_get_vs_memcpy", "rss_vs_cap", "ours_vs_lmcache_server_put",
                 "ours_vs_lmcache_server_get"):  # fmt: skip
        assert positive(result["ratios"][name]), name
    assert all(positive(value) for value in result["ratios"].values())
