"""The serde benchmark's goal arithmetic (the measurement itself runs the model: `bench serde`)."""

from __future__ import annotations

import pytest

from splitwise_bench.serde import cachegen_ratio_at, goal_rows


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
