"""`bench routing` end to end on real engines, small: both paths' TTFT and stall per length."""

from __future__ import annotations

import pytest

from splitwise_testing.bench_run import positive, run_bench

pytestmark = pytest.mark.engine

LENGTHS = (32, 64)


def test_bench_routing_short_run_measures_both_paths_per_length(tmp_path) -> None:
    short = ["--lengths", *map(str, LENGTHS), "--repeats", "1"]
    result = run_bench("routing", short, tmp_path / "routing.json", timeout_s=1200)

    assert list(result["lengths"]) == [str(n) for n in LENGTHS]
    for n, row in result["lengths"].items():
        assert set(row) == {"ttft_direct_ms", "ttft_disaggregated_ms", "stall_direct_ms",
                            "stall_disaggregated_ms", "itl_ms"}, n  # fmt: skip
        assert all(positive(value) for value in row.values()), (n, row)
    assert set(result["ratios"]) == {
        f"{name}_{n}"
        for n in LENGTHS
        for name in ("ttft_direct_vs_disaggregated", "stall_direct_vs_itl")
    }
    assert all(positive(value) for value in result["ratios"].values())
