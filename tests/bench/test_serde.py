"""The serde benchmark: its goal arithmetic, and `bench serde` end to end in a short run."""

from __future__ import annotations

import pytest

from splitwise_bench.serde import cachegen_ratio_at, goal_rows
from splitwise_testing.bench_run import positive, run_bench


def point(ratio: float, agreement: float, **extra: float) -> dict:
    return {"ratio": ratio, "agreement": agreement, "encode_gbps": 1.5, "decode_gbps": 0.2, **extra}


def test_cachegen_ratio_at_an_agreement() -> None:
    points = [point(6.0, 0.80), point(4.0, 0.90), point(3.0, 0.96)]
    assert cachegen_ratio_at(0.96, points) == 3.0  # measured
    assert cachegen_ratio_at(0.85, points) == pytest.approx(5.0)  # halfway between 6x and 4x
    assert cachegen_ratio_at(0.70, points) == 6.0
    assert cachegen_ratio_at(0.99, points) is None  # no setting gets there


def test_goal_rows_compare_cachegen_with_the_best_kivi_match() -> None:
    naive = point(1.0, 1.0, encode_decode_vs_memcpy=0.2, encode_into_decode_vs_memcpy=0.9)
    serdes = {
        "naive": naive,
        "kivi-2": point(6.4, 0.65),
        "kivi-4": point(3.5, 0.91),
        "kivi-8": point(1.9, 0.99),
        "cachegen": point(5.0, 0.91),
        "cachegen-5": point(2.9, 0.99),
    }
    rows = {row[0]: row for row in goal_rows(serdes)}
    gain = next(row for name, row in rows.items() if name.startswith("cachegen/kivi"))
    assert gain[0].endswith("(vs kivi-8)")  # 2.9x at kivi-8's agreement: the best match
    assert gain[1] == pytest.approx(2.9 / 1.9) and gain[3] == "yes"
    assert rows["naive enc+dec vs memcpy (encode to new bytes)"][3] == "NO"
    assert rows["naive enc+dec vs memcpy (encode_into a reused buffer)"][3] == "yes"
    assert rows["kivi-4 agreement"][3] == "NO"


def test_bench_serde_short_run_measures_every_setting(tmp_path) -> None:
    short = ["--prompts", "1", "--continuation", "4", "--repeats", "1", "--cachegen-bits", "2"]
    result = run_bench("serde", short, tmp_path / "serde.json", timeout_s=900)

    serdes = result["serdes"]
    assert list(serdes) == ["naive", "kivi-2", "kivi-4", "kivi-8", "cachegen", "cachegen-2"]
    assert result["prompts"] == 1 and result["positions"] == 4
    for name, measured in serdes.items():
        for key in ("ratio", "encode_gbps", "decode_gbps", "encode_decode_vs_memcpy"):
            assert positive(measured[key]), (name, key)
        assert 0 <= measured["agreement"] <= 1 and len(measured["rel_l2_per_layer"]) > 0
    assert serdes["naive"]["rel_l2_max"] == 0 and serdes["kivi-2"]["rel_l2_max"] > 0
    assert positive(serdes["naive"]["encode_into_decode_vs_memcpy"])
    assert len(result["goals"]) == 8
    for name in serdes:
        key = name.replace("-", "")
        assert positive(result["ratios"][f"{key}_bf16_over_payload_bytes"])
        assert positive(result["ratios"][f"{key}_encode_decode_vs_memcpy"])
    assert positive(result["ratios"]["naive_encode_into_decode_vs_memcpy"])
    assert result["ratios"]["cachegen_vs_kivi_size_at_equal_agreement"] >= 0
