"""A run's numbers from its requests: latency percentiles, SLO attainment, goodput, checks.

TTFT is the time to the first token, ITL the gaps between chunks, TPOT the mean time per output
token after the first (what SLOs are set on, as in DistServe) and E2E the whole request; SLO
attainment is the share of sent requests meeting the TTFT SLO, the TPOT SLO, both, and goodput
the requests per second meeting both.

A request refused by admission control (streaming.py: a 429 or 503 with `Retry-After`) is not a
failure: it is counted as `refused`, with how fast the refusal came and the Retry-After it
carried. It misses the SLOs in `attainment` (over every request sent) and is left out of
`attainment_admitted` (over the requests the server took on).
"""

from __future__ import annotations

from collections import Counter
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


def refusal_summary(refused: list[RequestResult]) -> dict[str, Any]:
    """How fast the refusals came (ms, to the whole answer), their statuses, and how many
    carried each Retry-After value (seconds)."""
    latency = [r.end_s for r in refused if r.end_s is not None]
    return {
        "latency_ms": percentiles_ms(latency) | {"max": max(latency) * 1e3 if latency else None},
        "statuses": {str(k): v for k, v in sorted(Counter(r.status for r in refused).items())},
        "retry_after_s": {
            f"{k:g}": v for k, v in sorted(Counter(r.retry_after_s for r in refused).items())
        },
    }


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
    """Shares of `results` that met the TTFT SLO, the TPOT SLO and both (DistServe's SLO
    attainment); a failed or refused request meets neither."""
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
    SLO attainment and goodput (requests meeting the TTFT SLO and the TPOT SLO), refusals."""
    done = [r for r in results if r.ok]
    refused = [r for r in results if r.refused]
    admitted = [r for r in results if not r.refused]
    met = attainment(results, slo_ttft_ms, slo_tpot_ms)
    problems = {r.spec.index: r.problems() for r in done if r.problems()}
    kinds = sorted({r.spec.kind for r in results})
    duration = max(duration_s, 1e-9)
    return {
        "duration_s": duration_s,
        "requests": len(results),
        "completed": len(done),
        "failed": len(admitted) - len(done),
        "refused": len(refused),
        "admitted": len(admitted),
        "requests_per_s": len(done) / duration,
        "output_tokens_per_s": sum(r.output_tokens for r in done) / duration,
        "goodput_requests_per_s": met["both"] * len(results) / duration,
        "slo_met": round(met["both"] * len(results)),
        "attainment": met,
        "attainment_admitted": attainment(admitted, slo_ttft_ms, slo_tpot_ms),
        "refusals": refusal_summary(refused),
        **{k: v for k, v in latency_summary(results).items() if k != "count"},
        "by_kind": {
            kind: latency_summary([r for r in results if r.spec.kind == kind]) for kind in kinds
        },
        "checks": {
            "requests_with_count_mismatch": len(problems),
            "multi_token_chunks": sum(r.multi_token_chunks for r in done),
            "problems": {str(i): p for i, p in sorted(problems.items())[:20]},
        },
        "errors": sorted({r.error for r in admitted if r.error})[:20],
    }
