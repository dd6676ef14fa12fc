"""goals.yaml as settings: both plans load, a family is met per request, bad files are refused."""

from __future__ import annotations

import pytest
import yaml

from splitwise_bench.experiment.plan import GOALS_FILE, PlanError, SloFamily, load


def record(ttft=100.0, tpot=20.0, chunks=(100.0, 120.0, 140.0), error=None) -> dict:
    return {"error": error, "chunk_ms": list(chunks), "ttft_ms": ttft, "tpot_ms": tpot}


def test_both_plans_load_with_every_goal_measured_on_a_known_family():
    for mode in ("full", "short"):
        goals = load(mode)
        assert goals.plan.mode == mode and set(goals.families) == {"ttft_bound", "itl_bound"}
        assert goals.plan.azure.cdf_rate in goals.plan.azure.rates
        assert len(goals.plan.azure.windows) >= 2 and len(goals.plan.mooncake.windows) >= 2
        assert goals.families["itl_bound"].itl_p99_ms and goals.families["ttft_bound"].tpot_ms
    full = load("full").goals
    assert (full["itl_goodput"].target, full["store_hit_ratio"].target) == (1.3, 0.8)
    assert (full["mooncake_ttft"].target, full["admission_ttft"].load) == (0.6, 3)


def test_a_family_is_met_only_when_every_bound_holds():
    ttft = SloFamily("t", "T", "", ttft_ms=2000, tpot_ms=50)
    itl = SloFamily("i", "I", "", ttft_ms=6000, itl_p99_ms=150)
    assert ttft.meets(record()) and itl.meets(record())
    assert not ttft.meets(record(ttft=2001)) and itl.meets(record(ttft=2001))
    assert not ttft.meets(record(tpot=51)) and itl.meets(record(tpot=51))
    stalled = record(chunks=[100, *range(120, 1100, 20), 1400])  # one 300 ms gap in 50
    assert ttft.meets(stalled) and not itl.meets(stalled)
    assert itl.meets(record(chunks=[100]))  # one token: no gap to judge
    assert not ttft.meets(record(error="HTTP 500")) and not itl.meets(record(error="HTTP 429"))


def test_a_goal_is_met_on_its_side_of_the_target():
    goals = load().goals
    assert goals["itl_goodput"].met(1.3) and not goals["itl_goodput"].met(1.29)
    assert goals["mooncake_ttft"].met(0.6) and not goals["mooncake_ttft"].met(0.61)
    assert goals["mooncake_ttft"].met(None) is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda g: g["goals"]["itl_goodput"].update(measure="speed"), "measures unknown"),
        (lambda g: g["goals"]["itl_goodput"].update(family="nope"), "unknown family"),
        (lambda g: g["goals"]["itl_goodput"].update(direction="=="), "direction"),
        (lambda g: g["goals"]["mooncake_ttft"].update(systems=["gpu"]), "unknown systems"),
        (lambda g: g["plans"]["full"].update(systems=["colocated", "x"]), "unknown system"),
        (lambda g: g["plans"]["full"]["azure"].update(cdf_rate=7), "cdf_rate"),
        (lambda g: g["plans"]["full"].pop("azure"), "KeyError"),
    ],
)
def test_a_file_that_cannot_be_used_is_refused_naming_what(tmp_path, edit, message):
    raw = yaml.safe_load(GOALS_FILE.read_text())
    edit(raw)
    path = tmp_path / "goals.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PlanError, match=message):
        load("full", path)
