"""The soak's short mode on the shared system (after the faults, so on a healed system):
the mixed workload for 90 seconds without an unexpected error, every component sampled.

The 30-minute run and its numbers: `bench soak --minutes 30`, docs/benchmarks/soak-cpu.md.
"""

from __future__ import annotations

import pytest

from splitwise_bench.soak import plot, soak

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]


def test_short_soak_serves_everything_and_samples_every_component(system, tmp_path):
    data = soak(system, minutes=1.5, rate=0.5, warmup_minutes=0.5, sample_every_s=5.0)
    assert data["requests"] >= 20
    assert data["unexpected_errors"] == 0, data["errors"]
    assert data["served"] == data["requests"]
    assert {"proxy", "store", "prefill engine", "decode engine"} <= set(data["components"])
    assert all(c["rss_mb_end"] > 0 and c["fds_end"] > 0 for c in data["components"].values())
    assert [row["minute"] for row in data["per_minute"]] == [0, 1]
    assert all("error" not in sample["store"] for sample in data["samples"])
    assert plot(data, tmp_path / "soak.png").stat().st_size > 10_000
