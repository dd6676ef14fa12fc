"""The experiment script and its report, with fake vLLM servers where real engines would run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from serve_fake import serve_fake

from splitwise_local.bench import experiment_report
from splitwise_local.cli import main

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
SMALL = {"REQUESTS": "4", "RATE": "20", "PROMPT_LEN": "24", "OUTPUT_LEN": "6",
         "LONG_PROMPT_LEN": "120", "LONG_OUTPUT_LEN": "3", "LONG_FRACTION": "0.5"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_script_runs_both_systems_and_writes_the_report(tmp_path):
    ports = {name: str(free_port()) for name in
             ("PLAIN_PORT", "PROXY_PORT", "PREFILL_PORT", "DECODE_PORT", "STORE_PORT")}  # fmt: skip
    out = tmp_path / "docs" / "splitwise-cpu"
    env = (
        os.environ
        | SMALL
        | ports
        | {
            "PYTHON": str(HERE / "fake_python"),
            "REAL_PYTHON": sys.executable,
            "OUT": str(out),
            "RUN_DIR": str(tmp_path / "run"),
            "READY_TIMEOUT": "60",
            "SEED": "11",
        }
    )
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "splitwise_experiment.sh")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    for system in ("colocated", "disaggregated"):
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert set(result[system][key]) >= {"p50", "p90", "p99"}
        assert result[system]["output_tokens_per_s"] > 0
        assert result[system]["settings"]["seed"] == 11
        assert "per_request" not in result[system]
    assert result["goal"]["judged"] is True
    assert result["goal"]["itl_p99_ratio"] == (
        result["disaggregated"]["itl_ms"]["p99"] / result["colocated"]["itl_ms"]["p99"]
    )
    # the store is not there (a fake stands in for the launcher): said, not fatal
    assert "error" in result["disaggregated"]["kv_cost"]["store"]
    report = out.with_suffix(".md").read_text()
    for expected in ("## Machine", "- seed: 11", "| ITL p99 (ms) |", "## Goal",
                     "![splitwise-cpu-latency-cdf.png]"):  # fmt: skip
        assert expected in report
    assert (out.parent / "splitwise-cpu-itl-over-time.png").is_file()
    assert not any(listening(int(p)) for p in ports.values())  # both fakes were stopped


def test_report_names_a_run_that_did_not_happen(tokenizer, tmp_path):
    with serve_fake(tokenizer) as (url, _):
        code = main(["bench", "serve", "--url", url, "--num-requests", "3", "--prompt-len", "16",
                     "--output-len", "4", "--long-prompt-len", "64", "--long-output-len", "2",
                     "--no-progress", "--json", str(tmp_path / "colocated.json")])  # fmt: skip
    assert code == 0
    log = tmp_path / "launcher.log"
    log.write_text("starting\nerror: port 8010 is already in use\n")
    out = tmp_path / "report" / "x"
    experiment_report.main(["--out", str(out), "--run", f"colocated={tmp_path / 'colocated.json'}",
                            "--run", f"disaggregated={tmp_path / 'missing.json'}",
                            "--log", f"disaggregated={log}"])  # fmt: skip
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["goal"] == {"judged": False, "reason": "one of the two runs has no results"}
    assert "error" in result["disaggregated"] and result["colocated"]["completed"] == 3
    report = out.with_suffix(".md").read_text()
    assert "| ITL p99 (ms) |" in report and "not run" in report
    assert "port 8010 is already in use" in report
