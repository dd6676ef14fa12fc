"""`bench store`'s LMCache comparison, run small against real processes."""

from __future__ import annotations

import argparse

from splitwise_bench import store_lmcache


def test_lmcache_server_and_our_store_side_by_side(capsys) -> None:
    args = argparse.Namespace(mb=16, repeats=1, fill_cap_mb=8)
    results = store_lmcache.measure(args)
    rows = results["throughput"]
    assert [(r["op"], r["size_mib"]) for r in rows] == [
        ("put", 1),
        ("get", 1),
        ("put", 16),
        ("get", 16),
    ]
    for row in rows:
        assert row["ratio"] == row["ours_gbps"] / row["lmcache_server_gbps"]
        assert min(row["socket_gbps"], row["ours_tcp_gbps"], row["ours_shm_gbps"]) > 0
    ratios = results["ratios"]
    assert ratios["ours_vs_lmcache_server_put"] == ratios["ours_vs_lmcache_server_put_16mib"]
    assert ratios["ours_vs_lmcache_server_get"] == rows[3]["ratio"]

    fill = results["fill"]
    assert [s["written_mib"] for s in fill["samples"]] == [8, 16, 24, 32]
    assert fill["ours_flat"]
    assert fill["lmcache_growth_mib"] > 16  # LMCache's server keeps every value it was sent

    store_lmcache.print_tables(results)
    out = capsys.readouterr().out
    assert "LMCache server" in out and "RSS past the cap" in out
