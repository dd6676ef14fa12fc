"""A run's numbers from constructed requests: which SLO each request meets, and refusals by
admission control (a 429 or 503 with Retry-After) counted apart from failures."""

from __future__ import annotations

import pytest

from splitwise_bench.latency import summarize
from splitwise_bench.streaming import RequestResult, parse_retry_after
from splitwise_bench.workloads import RequestSpec

SLO_TTFT_MS, SLO_TPOT_MS = 100.0, 20.0


def answered(index: int, ttft_s: float, tpot_s: float) -> RequestResult:
    """A 3-token answer with the given TTFT and TPOT."""
    chunks = [ttft_s, ttft_s + tpot_s, ttft_s + 2 * tpot_s]
    usage = {"prompt_tokens": 4, "completion_tokens": 3}
    return RequestResult(RequestSpec(index, "fixed", "p", 4, 3), 0.0, chunks, chunks[-1], 3,
                         usage=usage, status=200)  # fmt: skip


def turned_away(index: int, status: int | None, retry: float | None, end_s: float | None):
    """An answer that is not a 200 (status None: no answer at all)."""
    error = f"HTTP {status}: busy {index}" if status else "ReadTimeout: timed out"
    return RequestResult(RequestSpec(index, "fixed", "p", 4, 3), 0.0, end_s=end_s, error=error,
                         status=status, retry_after_s=retry)  # fmt: skip


def test_each_slo_is_judged_on_its_own():
    results = [
        answered(0, 0.05, 0.01),  # both
        answered(1, 0.5, 0.01),  # TPOT only
        answered(2, 0.05, 0.05),  # TTFT only
        answered(3, 0.5, 0.05),  # neither
    ]
    summary = summarize(results, 2.0, SLO_TTFT_MS, SLO_TPOT_MS)
    assert summary["attainment"] == {"ttft": 0.5, "tpot": 0.5, "both": 0.25}
    assert summary["attainment_admitted"] == summary["attainment"]
    assert summary["goodput_requests_per_s"] == pytest.approx(0.5)  # one of them, over 2 s
    assert summary["tpot_ms"]["p50"] == pytest.approx(30.0)


def test_refusals_are_429_or_503_with_retry_after_and_are_not_failures():
    results = [
        answered(0, 0.05, 0.01),
        answered(1, 0.5, 0.01),
        turned_away(2, 429, 2.0, 0.004),  # refused
        turned_away(3, 503, 0.5, 0.002),  # refused
        turned_away(4, 503, None, 0.003),  # failed: no Retry-After
        turned_away(5, 429, None, 0.003),  # failed: no Retry-After
        turned_away(6, 500, 1.0, 0.003),  # failed: not a refusal status
        turned_away(7, None, None, None),  # failed: no answer
    ]
    summary = summarize(results, 1.0, SLO_TTFT_MS, SLO_TPOT_MS)
    counts = {k: summary[k] for k in ("requests", "admitted", "completed", "failed", "refused")}
    assert counts == {"requests": 8, "admitted": 6, "completed": 2, "failed": 4, "refused": 2}
    # a refusal misses the SLOs over all requests, and is left out over the admitted ones
    assert summary["attainment"] == {"ttft": 1 / 8, "tpot": 2 / 8, "both": 1 / 8}
    assert summary["attainment_admitted"] == {"ttft": 1 / 6, "tpot": 2 / 6, "both": 1 / 6}
    refusals = summary["refusals"]
    assert refusals["statuses"] == {"429": 1, "503": 1}
    assert refusals["retry_after_s"] == {"0.5": 1, "2": 1}
    latency = refusals["latency_ms"]
    assert (latency["p50"], latency["max"]) == (pytest.approx(3.0), pytest.approx(4.0))
    assert summary["errors"] == sorted(r.error for r in results[4:])  # the failures only
    records = [r.as_dict() for r in results]
    assert [r["refused"] for r in records] == [False, False, True, True] + [False] * 4
    assert [r["refused_ms"] for r in records[2:4]] == [4.0, 2.0]


def test_a_run_without_refusals_says_so():
    summary = summarize([answered(0, 0.05, 0.01)], 1.0, SLO_TTFT_MS, SLO_TPOT_MS)
    assert summary["refused"] == 0
    assert summary["refusals"]["latency_ms"]["max"] is None
    assert summary["refusals"]["retry_after_s"] == {}


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
     ("soon", None), (None, None)],
)  # fmt: skip
def test_retry_after_in_seconds_or_as_a_date(header, seconds):
    assert parse_retry_after(header) == seconds


def test_retry_after_as_a_future_date_is_the_seconds_until_then():
    assert parse_retry_after("Fri, 01 Jan 2999 00:00:00 GMT") > 3e10
