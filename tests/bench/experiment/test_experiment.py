"""The experiment end to end in its short mode, with fake vLLM servers where engines would run.

`tests/bench/experiment/fake_python` stands in for the interpreter: `-m splitwise_local engine` and
`-m splitwise_local serve` start a fake vLLM server on their `--port` instead of real engines
(or the whole launcher); everything else (the proxy, bench sweep and serve, vLLM's own client,
the report) runs for real. So this checks the orchestration, the files and the report's
arithmetic, not engine behaviour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from splitwise_bench import sweep
from splitwise_bench.experiment import experiment_report
from splitwise_local.serve.process import tagged

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    root = tmp_path_factory.mktemp("experiment")
    env = os.environ | {"PYTHON": str(HERE / "fake_python"), "REAL_PYTHON": sys.executable}
    run_dir, out = root / "run", root / "docs" / "splitwise-cpu"
    done = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "splitwise_experiment.sh"),
            "--short",
            "--run-dir",
            str(run_dir),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return done, run_dir, out


def test_every_system_is_swept_and_measured(experiment):
    done, run_dir, out = experiment
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert list(result["systems"]) == ["colocated", "dp", "1p1d", "auto"]
    for name, system in result["systems"].items():
        assert "error" not in system["entry"], (name, system["entry"])
        assert system["entry"]["exit_codes"] == {
            "sweep": 0,
            "vllm": 0,
            "crosscheck": 0,
            "multi-turn": 0,
            "short": 0,
        }
        runs = system["sweep"]["runs"]
        assert {(r["seed"], r["rate"]) for r in runs} == {
            (0, 20.0),
            (0, 40.0),
            (1, 20.0),
            (1, 40.0),
        }
        assert all(r["completed"] == 4 and "per_request" not in r for r in runs)
        assert system["sweep"]["capacity"] == sweep.capacity(runs)
        assert system["vllm"]["completed"] == 4 and system["crosscheck"]["completed"] == 4
        assert system["multi_turn"]["settings"]["kind"] == "multi-turn"
        assert system["short"]["settings"]["concurrency"] == 3
    assert not tagged(str(run_dir))  # every system was stopped


def test_the_same_requests_reach_every_system(experiment):
    _, run_dir, _ = experiment
    prompts = {}
    for name in ("colocated", "dp", "1p1d", "auto"):
        found = json.loads((run_dir / name / "sweep.json").read_text())
        records = [r for run in found["runs"] for r in run.get("per_request", [])]
        prompts[name] = [(r["index"], r["kind"], r["prompt_len"], r["output_len"]) for r in records]
    assert prompts["colocated"] and all(p == prompts["colocated"] for p in prompts.values())


def test_report_judges_every_goal_and_draws_the_plots(experiment):
    _, run_dir, out = experiment
    result = json.loads(out.with_suffix(".json").read_text())
    goals = result["goals"]
    assert goals["best disaggregated capacity / best colocated baseline"]["target"] == 1.5
    judged = [g for g in goals.values() if g["met"] is not None]
    assert len(judged) == len(goals)  # everything measured in the short run
    ratios = result["ratios"]
    capacities = {
        n: result["systems"][n]["sweep"]["capacity"]["interpolated"]["mean"]
        for n in result["systems"]
    }
    assert ratios["capacity_disagg_vs_colocated"] == pytest.approx(
        max(capacities["1p1d"], capacities["auto"]) / max(capacities["colocated"], capacities["dp"])
    )
    auto, colocated = result["systems"]["auto"]["vllm"], result["systems"]["colocated"]["vllm"]
    assert ratios["auto_ttft_p50_vs_colocated"] == pytest.approx(
        auto["ttft_ms"]["p50"] / colocated["ttft_ms"]["p50"]
    )
    assert "crosscheck_dp_itl_p50_ours_vs_vllm" in ratios
    assert set(result["placement_study"]) == {"float", "core0", "core1"}
    assert "other CPU" in out.with_suffix(".md").read_text()
    report = out.with_suffix(".md").read_text()
    for heading in (
        "## Machine, and how quiet it was",
        "## SLOs",
        "## Goals",
        "## Where disaggregation loses",
        "## vLLM's own client beside ours",
        "## Multi-turn chat",
        "## Short prompts",
    ):
        assert heading in report
    for png in ("attainment", "latency-cdf", "itl-over-time"):
        path = out.parent / f"splitwise-cpu-{png}.png"
        assert path.read_bytes()[:4] == b"\x89PNG"
        assert f"]({path.name})" in report
    # the report can be written again from the run folder alone
    again = out.parent / "again"
    experiment_report.main(["--run-dir", str(run_dir), "--out", str(again)])
    assert json.loads(again.with_suffix(".json").read_text())["ratios"] == ratios


def test_a_system_that_cannot_start_is_reported_not_fatal(tmp_path):
    env = os.environ | {
        "PYTHON": str(HERE / "fake_python"),
        "REAL_PYTHON": sys.executable,
        "FAKE_FAIL": "serve",
    }
    out = tmp_path / "docs" / "x"
    done = subprocess.run(
        [
            "bash",
            str(REPO / "scripts" / "splitwise_experiment.sh"),
            "--short",
            "--systems",
            "1p1d",
            "--run-dir",
            str(tmp_path / "run"),
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    result = json.loads(out.with_suffix(".json").read_text())
    assert "launcher exited" in result["systems"]["1p1d"]["entry"]["error"]
    report = out.with_suffix(".md").read_text()
    assert "## 1p1d: did not run" in report and "fake launcher failed on purpose" in report
