"""A run's numbers from its requests: latency percentiles, SLO attainment, goodput, checks.

TTFT is the time to the first token, ITL the gaps between chunks, TPOT the mean time per output
token after the first (what SLOs are set on, as in DistServe) and E2E the whole request; SLO
attainment is the share of sent requests meeting the TTFT SLO, the TPOT SLO, both, and goodput
the requests per second meeting both.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from splitwise_bench.streaming import RequestResult

PERCENTILES = (50, 90, 99)


def percentiles_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {f"p{p}": None for p in PERCENTILES} | {"mean": None}
    ms = np.asarray(values_s) * 1e3
    stats = {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}
    return stats | {"mean": float(ms.mean())}


def latency_summary(results: list[RequestResult]) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    return {
        "count": len(done),
        "ttft_ms": percentiles_ms([r.ttft_s for r in done]),
        "tpot_ms": percentiles_ms([r.tpot_s for r in done if r.output_tokens > 1]),
        "itl_ms": percentiles_ms([gap for r in done for gap in r.itl_s]),
        "e2e_ms": percentiles_ms([r.end_s for r in done if r.end_s is not None]),
    }


def attainment(
    results: list[RequestResult], slo_ttft_ms: float, slo_tpot_ms: float
) -> dict[str, float]:
    """Shares of all sent requests that met the TTFT SLO, the TPOT SLO and both (DistServe's
    SLO attainment); a failed request meets neither."""
    sent = max(len(results), 1)
    ttft = [r.ok and r.ttft_s * 1e3 <= slo_ttft_ms for r in results]
    tpot = [r.ok and r.tpot_s * 1e3 <= slo_tpot_ms for r in results]
    return {
        "ttft": sum(ttft) / sent,
        "tpot": sum(tpot) / sent,
        "both": sum(a and b for a, b in zip(ttft, tpot, strict=True)) / sent,
    }


def summarize(
    results: list[RequestResult], duration_s: float, slo_ttft_ms: float, slo_tpot_ms: float
) -> dict[str, Any]:
    """The run's numbers: pooled latency percentiles, per request kind too, throughput,
    SLO attainment and goodput (requests meeting the TTFT SLO and the TPOT SLO)."""
    done = [r for r in results if r.ok]
    met = attainment(results, slo_ttft_ms, slo_tpot_ms)
    problems = {r.spec.index: r.problems() for r in done if r.problems()}
    kinds = sorted({r.spec.kind for r in results})
    duration = max(duration_s, 1e-9)
    return {
        "duration_s": duration_s,
        "requests": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "requests_per_s": len(done) / duration,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / duration,
        "goodput_requests_per_s": met["both"] * len(results) / duration,
        "slo_met": round(met["both"] * len(results)),
        "attainment": met,
        **{k: v for k, v in latency_summary(results).items() if k != "count"},
        "by_kind": {
            kind: latency_summary([r for r in results if r.spec.kind == kind]) for kind in kinds
        },
        "checks": {
            "requests_with_count_mismatch": len(problems),
            "multi_token_chunks": sum(r.multi_token_chunks for r in done),
            "problems": {str(i): p for i, p in sorted(problems.items())[:20]},
        },
        "errors": sorted({r.error for r in results if r.error})[:20],
    }
