"""vLLM's own benchmark client against our proxy, unchanged, and the cross-check of two clients.

The real-engine tests share one `python -m splitwise_local` (1P1D) and run vLLM's client the way
a user runs it here (`python -m splitwise_bench.vllm_client` + `vllm bench serve`'s own
arguments), for streamed completions and chat, and beside `bench serve` with the same shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from splitwise_bench import vllm_client
from splitwise_local.cli import main
from tests.serve.helpers import READY, Launch, Ports, leftovers, sweep

PROMPTS, INPUT_LEN, OUTPUT_LEN = 3, 96, 8


def test_summary_rebuilds_each_request_from_vllms_lists():
    result = {
        "completed": 1,
        "failed": 1,
        "duration": 2.0,
        "request_throughput": 0.5,
        "output_throughput": 1.5,
        "total_output_tokens": 3,
        "p50_ttft_ms": 100.0,
        "mean_ttft_ms": 100.0,
        "p99_itl_ms": 20.0,
        "ttfts": [0.1, 0.0],
        "itls": [[0.01, 0.02], []],
        "latencies": [0.13, 0.0],
        "output_lens": [3, 0],
        "input_lens": [10, 10],
        "errors": ["", "boom"],
    }
    found = vllm_client.summary(result)
    assert found["requests"] == 2 and found["ttft_ms"]["p50"] == 100.0
    assert found["itl_ms"]["p99"] == 20.0 and found["tpot_ms"]["p50"] is None
    ok, failed = found["per_request"]
    assert ok["chunk_ms"] == pytest.approx([100.0, 110.0, 130.0]) and ok["error"] is None
    assert failed["chunk_ms"] == [] and failed["ttft_ms"] is None and failed["error"] == "boom"


def test_cross_check_compares_statistic_by_statistic():
    ours = {
        "ttft_ms": {"p50": 115.0, "mean": 100.0},
        "tpot_ms": {"p50": 10.0, "mean": 10.0},
        "itl_ms": {"p50": 10.0, "mean": 10.0},
    }
    theirs = {
        "ttft_ms": {"p50": 100.0, "mean": 100.0},
        "tpot_ms": {"p50": 8.0, "mean": 10.0},
        "itl_ms": {"p50": 10.0, "mean": None},
    }
    found = vllm_client.cross_check(ours, theirs)
    assert found["stats"]["ttft_p50"]["ratio"] == pytest.approx(1.15)
    assert found["stats"]["ttft_p50"]["within"] is True  # 15% is inside
    assert found["stats"]["tpot_p50"]["within"] is False  # 25% is not
    assert found["stats"]["itl_mean"]["ratio"] is None  # not measured is not agreement
    assert found["agree"] is False


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> str:
    """One real 1P1D system (store, prefill and decode engines, proxy) for this module."""
    root = tmp_path_factory.mktemp("vllm-client") / "run"
    ports = Ports.for_engines(1, 1)
    launch = Launch([*ports.args(), "--log-level", "warning"], root)
    try:
        launch.wait_for(READY, 600)
        yield f"http://127.0.0.1:{ports.proxy}"
    finally:
        launch.stop()
        sweep(root)
    assert not leftovers(root)


def run_vllm_client(tmp_path: Path, url: str, *args: str) -> dict:
    """vLLM's client as a user runs it here; its summary in bench serve's terms."""
    from splitwise_local.models.hub import resolve_model

    out = tmp_path / "vllm.json"
    command = [
        sys.executable,
        "-m",
        "splitwise_bench.vllm_client",
        "--summary-json",
        str(out),
        "--base-url",
        url,
        "--tokenizer",
        str(resolve_model(None).folder),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(INPUT_LEN),
        "--random-output-len",
        str(OUTPUT_LEN),
        "--num-prompts",
        str(PROMPTS),
        "--seed",
        "1",
        "--temperature",
        "0",
        "--disable-tqdm",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.exists(), done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()) | {"exit": done.returncode, "stdout": done.stdout}


@pytest.mark.engine
@pytest.mark.parametrize(
    ("backend", "endpoint"),
    [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")],
)
def test_vllms_client_measures_streams_through_the_proxy(proxy, tmp_path, backend, endpoint):
    found = run_vllm_client(tmp_path, proxy, "--backend", backend, "--endpoint", endpoint)
    assert found["exit"] == 0, found["stdout"][-2000:]
    assert found["completed"] == PROMPTS and found["failed"] == 0
    assert found["total_output_tokens"] == PROMPTS * OUTPUT_LEN  # ignore_eos: exact lengths
    for stat in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < found[stat]["p50"] <= found[stat]["p99"]
    assert all(len(r["chunk_ms"]) >= 2 for r in found["per_request"])  # really streamed


@pytest.mark.engine
def test_a_non_streamed_request_of_vllms_client_is_answered_as_the_engine_answers(proxy, tmp_path):
    # vLLM's client parses server-sent events only: with stream off it counts every answer as
    # failed, against vLLM itself too. What the proxy owes it is the engine's own answer.
    body = {
        "model": httpx.get(f"{proxy}/v1/models").json()["data"][0]["id"],
        "prompt": "The capital of France is",
        "max_tokens": OUTPUT_LEN,
        "temperature": 0.0,
        "repetition_penalty": 1.0,
        "logprobs": None,
        "ignore_eos": True,
        "stream": False,
        "stream_options": None,
    }
    answer = httpx.post(f"{proxy}/v1/completions", json=body, timeout=120)
    assert answer.status_code == 200
    whole = answer.json()
    assert whole["usage"]["completion_tokens"] == OUTPUT_LEN and whole["choices"][0]["text"]
    found = run_vllm_client(
        tmp_path, proxy, "--extra-body", '{"stream": false, "stream_options": null}'
    )
    assert found["failed"] == PROMPTS and found["completed"] == 0
    assert "Never received a valid chunk" in found["errors"][0]


@pytest.mark.engine
def test_cross_check_of_vllms_client_and_bench_serve(proxy, tmp_path):
    theirs = run_vllm_client(tmp_path, proxy, "--request-rate", "2")
    out = tmp_path / "ours.json"
    code = main(
        [
            "bench",
            "serve",
            "--url",
            proxy,
            "--workload",
            "fixed",
            "--prompt-len",
            str(INPUT_LEN),
            "--output-len",
            str(OUTPUT_LEN),
            "--num-requests",
            str(PROMPTS),
            "--rate",
            "2",
            "--seed",
            "1",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    ours = json.loads(out.read_text())
    assert code == 0 and theirs["exit"] == 0
    assert ours["completed"] == theirs["completed"] == PROMPTS
    assert sum(r["output_tokens"] for r in ours["per_request"]) == theirs["total_output_tokens"]
    check = vllm_client.cross_check(ours, theirs)
    assert set(check["stats"]) == {
        f"{m}_{s}" for m in ("ttft", "tpot", "itl") for s in ("p50", "mean")
    }
    assert all(row["ratio"] is not None and row["ratio"] > 0 for row in check["stats"].values())
