"""The experiment end to end in its short plan, with fake engines where vLLM would run.

`fake_python` stands in for the interpreter: `-m splitwise_local engine` and `-m splitwise_local
serve` start fake_system.py (fake engines with a prefix cache, a fake launcher with a store and
admission control) instead; everything else (the proxy in front of the plain engines, `bench
serve --trace`, the report) runs for real. So this checks the orchestration, the files and the
report's arithmetic, not engine behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from splitwise_bench.experiment import plan, report
from splitwise_local.serve.process import tagged

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).parent
SYSTEMS = ["colocated", "dp", "1p1d", "auto"]


def run_script(root: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    environment = os.environ | {"PYTHON": str(HERE / "fake_python"), "REAL_PYTHON": sys.executable}
    return subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "splitwise_experiment.sh"),
            "--short",
            "--run-dir",
            str(root / "run"),
            "--out",
            str(root / "docs" / "splitwise-traces"),
            *extra,
        ],
        env=environment | env,
        capture_output=True,
        text=True,
        timeout=1800,
    )


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("experiment")
    done = run_script(root)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = root / "docs" / "splitwise-traces"
    return root / "run", out, json.loads(out.with_suffix(".json").read_text())


def runs_of(run_dir: Path, system: str, phase: str) -> dict[str, dict]:
    found = sorted((run_dir / system / phase).glob("*.json"))
    return {p.stem: json.loads(p.read_text()) for p in found if not p.stem.endswith("-timeline")}


def test_every_system_replays_both_traces_and_is_stopped(experiment):
    run_dir, _, result = experiment
    short = plan.load("short").plan
    manifest = result["manifest"]
    assert list(manifest["systems"]) == [*SYSTEMS, "admission"]
    assert all("error" not in entry for entry in manifest["systems"].values())
    for name in SYSTEMS:
        azure = runs_of(run_dir, name, "azure")
        expected = {f"w{w:g}-r{r:g}" for w in short.azure.windows for r in short.azure.rates}
        assert set(azure) == expected
        for found in azure.values():
            assert found["trace"]["name"] == "azure-conv" and found["completed"] == 6
        mooncake = runs_of(run_dir, name, "mooncake")
        if name in short.mooncake.systems:
            assert set(mooncake) == {f"s{s}" for s in short.mooncake.windows}
            assert all(m["trace"]["window"]["sessions"] == 0.01 for m in mooncake.values())
        else:
            assert not mooncake
    assert all(run["exit"] == 0 for key, run in manifest["runs"].items() if "admission" not in key)
    assert not tagged(str(run_dir))  # every system was stopped


def test_every_system_gets_the_same_requests_at_the_same_times(experiment):
    run_dir, _, _ = experiment
    sent = {}
    for name in SYSTEMS:
        runs = runs_of(run_dir, name, "azure")
        sent[name] = {
            key: [
                (r["index"], r["prompt_len"], r["output_len"], r["scheduled_s"])
                for r in found["per_request"]
            ]
            for key, found in runs.items()
        }
    assert sent["colocated"] and all(s == sent["colocated"] for s in sent.values())
    first = sent["colocated"]["w600-r20"]
    assert first != sent["colocated"]["w600-r40"]  # each rate draws its own prompts and times


def meets_itl_bound(record: dict, ttft_ms: float, itl_p99_ms: float) -> bool:
    """The ITL-bound family, written out again from its definition in goals.yaml."""
    if record["error"] is not None:
        return False
    gaps = np.diff(record["chunk_ms"])
    return record["ttft_ms"] <= ttft_ms and (
        gaps.size == 0 or np.percentile(gaps, 99) <= itl_p99_ms
    )


def test_goodput_counts_the_requests_that_meet_the_family(experiment):
    run_dir, _, result = experiment
    family = yaml.safe_load(plan.GOALS_FILE.read_text())["slo_families"]["itl_bound"]
    for name in SYSTEMS:
        runs = runs_of(run_dir, name, "azure")
        curve = result["azure"][name]["curve"]
        for point in curve:
            expected = [
                sum(
                    meets_itl_bound(r, family["ttft_ms"], family["itl_p99_ms"])
                    for r in found["per_request"]
                )
                / found["duration_s"]
                for key, found in runs.items()
                if key.endswith(f"-r{point['rate']:g}")
            ]
            goodput = point["itl_bound"]["goodput"]
            assert goodput["mean"] == pytest.approx(np.mean(expected))
            assert (goodput["min"], goodput["max"]) == pytest.approx((min(expected), max(expected)))
    peaks = {
        n: max(p["itl_bound"]["goodput"]["mean"] for p in result["azure"][n]["curve"])
        for n in SYSTEMS
    }
    assert result["ratios"]["itl_goodput"] == pytest.approx(
        max(peaks["1p1d"], peaks["auto"]) / max(peaks["colocated"], peaks["dp"])
    )


def test_the_store_hit_ratio_comes_from_the_engines_counters(experiment):
    run_dir, _, result = experiment
    for name in ("1p1d", "auto"):
        for seed in result["mooncake"][name]["per_seed"]:
            found = json.loads((run_dir / name / "mooncake" / f"s{seed['seed']}.json").read_text())
            samples = json.loads(
                (run_dir / name / "mooncake" / f"s{seed['seed']}-timeline.json").read_text()
            )["samples"]
            saved = sum(
                (samples[-1]["counters"][c] or {}).get("splitwise:saved_tokens", 0)
                - (samples[0]["counters"][c] or {}).get("splitwise:saved_tokens", 0)
                for c in ("prefill", "decode")
            )
            sent = sum(r["prompt_len"] for r in found["per_request"])
            assert saved > 0 and seed["store_hit_ratio"] == pytest.approx(1 - saved / sent)
            lru = {
                c["capacity_bytes"]: c["token_ratio"] for c in found["trace"]["prefix_reuse"]["lru"]
            }
            assert seed["ideal_at_store"] == lru[plan.load("short").plan.store_capacity_bytes()]
            # the fake store holds every prefix it saw, at a block size the trace's need not
            # match: near the ideal, never above what was sent twice
            assert 0 < seed["store_hit_ratio"] <= seed["ideal"] + 0.05
    goal = result["goals"]["store_hit_ratio"]
    per_seed = [
        s["store_hit_ratio"] / s["ideal_at_store"] for s in result["mooncake"]["1p1d"]["per_seed"]
    ]
    assert goal["measured"] == pytest.approx(np.mean(per_seed))
    assert result["mooncake"]["colocated"]["store_hit_ratio"]["mean"] is None  # no store


def test_admission_refuses_at_overload_and_answers_every_request(experiment):
    _, _, result = experiment
    points = result["admission"]["points"]
    assert [p["load"] for p in points] == [1.0, 3.0]
    top = points[-1]
    assert top["refused"] > 0 and top["admitted"] > 0 and top["timed_out"] == 0
    assert top["admitted"] + top["refused"] + top["failed"] == top["sent"]
    assert all("429" in error for error in top["refusal_errors"])
    capacity = result["admission"]["capacity"]["req_per_s"]
    assert top["rate"] == pytest.approx(3 * capacity)
    assert result["goals"]["admission_ttft"]["measured"] == pytest.approx(
        top["admitted_ttft_p99_ms"] / 2000
    )


def test_the_report_judges_every_goal_of_goals_yaml_and_draws_the_plots(experiment):
    _, out, result = experiment
    written = yaml.safe_load(plan.GOALS_FILE.read_text())["goals"]
    assert set(result["goals"]) == set(written) <= set(result["ratios"])
    for name, goal in result["goals"].items():
        assert (goal["target"], goal["direction"]) == (
            written[name]["target"],
            written[name]["direction"],
        )
        assert goal["met"] is not None, (name, goal)  # everything is measured in the short run
    assert {"command", "commit", "machine"} <= set(result)
    assert result["machine"]["cpu"] and result["machine"]["isa"]
    text = out.with_suffix(".md").read_text()
    for heading in (
        "## Answers",
        "## Goals",
        "## Machine, and how quiet it was",
        "## SLO families",
        "## Azure conversation trace",
        "## Mooncake conversation trace",
        "## Admission control",
    ):
        assert heading in text
    for png in ("attainment", "cdf", "hit-ratio", "admission"):
        path = out.parent / f"splitwise-traces-{png}.png"
        assert path.read_bytes()[:4] == b"\x89PNG" and f"]({path.name})" in text


def test_the_report_is_rewritten_from_the_run_folder_keeping_the_hand_written_reading(
    experiment, tmp_path
):
    run_dir, _, result = experiment
    again = tmp_path / "again"
    again.with_suffix(".md").write_text(f"old\n{report.HAND_WRITTEN}\nWhy: read by hand.\n")
    assert report.main(["--run-dir", str(run_dir), "--out", str(again)]) == 0
    assert json.loads(again.with_suffix(".json").read_text())["ratios"] == result["ratios"]
    text = again.with_suffix(".md").read_text()
    assert text.startswith("# The Splitwise experiment") and "old\n" not in text
    assert text.endswith(f"{report.HAND_WRITTEN}\nWhy: read by hand.\n")


def test_a_system_that_cannot_start_is_reported_not_fatal(tmp_path):
    done = run_script(tmp_path, "--systems", "1p1d", FAKE_FAIL="serve")
    assert done.returncode == 1
    result = json.loads((tmp_path / "docs" / "splitwise-traces.json").read_text())
    assert "launcher exited" in result["manifest"]["systems"]["1p1d"]["error"]
    text = (tmp_path / "docs" / "splitwise-traces.md").read_text()
    assert "## 1p1d: did not run" in text and "fake launcher failed on purpose" in text
