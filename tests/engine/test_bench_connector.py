"""`bench connector` end to end on real engines, small, stall included: every number the full
run reports is measured and written out."""

from __future__ import annotations

import pytest

from splitwise_testing.bench_run import positive, run_bench

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 300
NEW_TOKENS = 8
STREAM_TOKENS = 500  # after its 200 quiet tokens, outlasts four 300-token landings


def test_bench_connector_short_run_measures_ttft_load_and_stall(tmp_path) -> None:
    short = ["--prompt-tokens", str(PROMPT_TOKENS), "--repeats", "1",
             "--new-tokens", str(NEW_TOKENS), "--stream-tokens", str(STREAM_TOKENS)]  # fmt: skip
    result = run_bench("connector", short, tmp_path / "connector.json", timeout_s=1200)

    for key in ("recompute_ttft_ms", "loaded_ttft_ms", "loaded_tokens"):
        assert len(result[key]) == 1 and positive(result[key][0]), key
    assert result["loaded_tokens"][0] <= PROMPT_TOKENS
    for key in ("kv_bytes_per_request", "load_ms", "load_gbps", "store_get_gbps"):
        assert positive(result[key]), key
    assert len(result["first_divergence"]) == 1
    assert 0 <= result["first_divergence"][0] <= NEW_TOKENS
    for case in ("stall_loaded", "stall_recompute"):
        stall = result[case]
        assert all(positive(stall[key]) for key in ("quiet_p50_ms", "max_gap_ms", "landing_s"))
        assert stall["ratio"] == pytest.approx(stall["max_gap_ms"] / stall["quiet_p50_ms"])
    layout = result["layout"]
    assert layout["layers"] > 0 and all(
        positive(layout[key]) for key in ("scatter_gbps", "gather_gbps", "memcpy_gbps")
    )
    assert "peer" not in result
    assert set(result["ratios"]) == {
        "ttft_loaded_vs_recompute", "load_gbps_vs_store_get", "stall_max_vs_quiet_p50",
        "stall_max_vs_quiet_p50_recompute", "layout_scatter_vs_memcpy",
        "layout_gather_vs_memcpy",
    }  # fmt: skip
    assert all(positive(value) for value in result["ratios"].values())
    assert result["ratios"]["stall_max_vs_quiet_p50"] == result["stall_loaded"]["ratio"]
