"""`bench serve` against a real streaming server on 127.0.0.1: its numbers must add up."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
from serve_fake import (
    KV_BYTES_PER_PROMPT_TOKEN,
    MAX_MODEL_LEN,
    MODEL,
    FakeVLLM,
    Knobs,
    serve_fake,
)

from splitwise_bench.trace_files import load_trace
from splitwise_bench.traces import ReplaySettings, build_replay
from splitwise_local.cli import main
from splitwise_local.proxy.app import build_app
from splitwise_local.proxy.settings import ProxySettings
from splitwise_testing.scrape import value
from tests.proxy.servers import Servers

LOOSE_SLOS = ["--slo-ttft-ms", "1e9", "--slo-tpot-ms", "1e9"]  # met by every answer
HANG_GUARD_S = 120  # a deadline that only a hang reaches: the run below takes seconds
SMALL = ["--num-requests", "6", "--prompt-len", "24", "--output-len", "8",
         "--long-prompt-len", "200", "--long-output-len", "4", "--long-fraction", "0.34",
         "--no-progress", "--warmup", "1", "--seed", "5"]  # fmt: skip


def bench(url: str, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "serve.json"
    code = main(["bench", "serve", "--url", url, "--json", str(out), *SMALL, *extra])
    return code, json.loads(out.read_text())


def assert_ordered(stats: dict) -> None:
    assert stats["p50"] <= stats["p90"] <= stats["p99"]
    assert stats["p50"] > 0


def test_mixed_run_numbers_are_consistent(tokenizer, tmp_path):
    with serve_fake(tokenizer) as (url, fake):
        code, result = bench(url, tmp_path, "--rate", "40", "--plot-dir", str(tmp_path / "p"))
    assert code == 0
    for key in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert set(result[key]) >= {"p50", "p90", "p99"}
        assert_ordered(result[key])
    assert result["completed"] == 6 and result["failed"] == 0
    assert result["checks"]["requests_with_count_mismatch"] == 0
    assert 0 < result["goodput_requests_per_s"] <= result["requests_per_s"]
    assert result["output_tokens_per_s"] == pytest.approx(
        sum(r["output_tokens"] for r in result["per_request"]) / result["duration_s"]
    )
    # TTFT <= E2E for every request; ITL samples = tokens - 1 per request
    for record in result["per_request"]:
        assert record["ttft_ms"] <= record["e2e_ms"]
        assert len(record["chunk_ms"]) == record["output_tokens"] == record["output_len"]
    assert set(result["by_kind"]) == {"short", "long"}
    assert result["settings"]["rate"] == 40.0 and result["settings"]["seed"] == 5
    # what was sent: the served model, exact lengths, vLLM's streaming extensions
    sent = fake.requests[1:]  # the first one is the warm-up
    assert len(sent) == 6 and all(b["model"] == MODEL and b["ignore_eos"] for b in sent)
    assert all(b["stream_options"] == {"include_usage": True} for b in sent)
    assert sorted(b["max_tokens"] for b in sent) == sorted(
        r["output_len"] for r in result["per_request"]
    )
    pngs = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert pngs == ["itl-over-time.png", "latency-cdf.png"]
    assert all((tmp_path / "p" / n).read_bytes()[:4] == b"\x89PNG" for n in pngs)


def test_chunks_are_timed_as_they_arrive(tokenizer, tmp_path):
    """The fake sleeps 10 ms before each of its 8 tokens: no token can arrive sooner than that
    after the request was sent, however slow the machine (a lower bound, not a speed check).
    Which SLO each request meets is judged on constructed timings in test_latency.py."""
    with serve_fake(tokenizer, Knobs(token_interval_s=0.01)) as (url, _):
        _, result = bench(url, tmp_path, "--workload", "fixed", *LOOSE_SLOS)
    assert result["attainment"] == {"ttft": 1.0, "tpot": 1.0, "both": 1.0}
    for record in result["per_request"]:
        assert len(record["chunk_ms"]) == 8
        assert all(t >= 10 * (k + 1) - 1 for k, t in enumerate(record["chunk_ms"]))
        # TPOT: (last chunk - first) / (tokens - 1)
        gaps = record["chunk_ms"][-1] - record["chunk_ms"][0]
        assert record["tpot_ms"] == pytest.approx(gaps / (record["output_tokens"] - 1), abs=1e-3)
    assert set(result["host_load"]) >= {"foreign_fraction", "ours_core_s", "quiet"}


def test_coalesced_chunks_count_every_token(tokenizer, tmp_path):
    with serve_fake(tokenizer, Knobs(coalesce_every=3)) as (url, _):
        code, result = bench(url, tmp_path, "--workload", "fixed", "--concurrency", "3")
    assert code == 0
    assert result["checks"]["multi_token_chunks"] > 0
    assert all(r["output_tokens"] == 8 for r in result["per_request"])


def test_usage_that_disagrees_with_the_stream_fails_the_run(tokenizer, tmp_path, capsys):
    with serve_fake(tokenizer, Knobs(usage_error=1)) as (url, _):
        code, result = bench(url, tmp_path, "--workload", "fixed")
    assert code == 1
    assert result["checks"]["requests_with_count_mismatch"] == 6
    assert "usage says 9" in result["checks"]["problems"]["0"][0]
    assert "token counts disagree" in capsys.readouterr().err


def test_failed_requests_are_counted_not_measured(tokenizer, tmp_path):
    # request 1 is the warm-up; then every 3rd request fails: measured requests 2 and 5
    with serve_fake(tokenizer, Knobs(fail_every=3)) as (url, _):
        code, result = bench(
            url, tmp_path, "--workload", "fixed", "--concurrency", "1", *LOOSE_SLOS
        )
    assert code == 1
    assert result["failed"] == 2 and result["completed"] == 4 and result["refused"] == 0
    # a failed request meets no SLO: 4 of the 6 sent met both (SLOs no answer misses)
    assert result["attainment"] == {"ttft": 4 / 6, "tpot": 4 / 6, "both": 4 / 6}
    assert result["requests_per_s"] == pytest.approx(4 / result["duration_s"])
    assert any("HTTP 500" in e for e in result["errors"])


def test_kv_cost_is_diffed_per_request_and_a_missing_store_is_reported(tokenizer, tmp_path):
    with serve_fake(tokenizer) as (url, _):
        code, result = bench(
            url,
            tmp_path,
            "--workload",
            "fixed",
            "--metrics-url",
            f"{url}/metrics",
            "--store-url",
            "lm://127.0.0.1:9",
        )
    assert code == 0
    metrics = result["kv_cost"]["metrics"][f"{url}/metrics"]
    per_request = metrics["per_request"]
    assert per_request["splitwise_kv_bytes_loaded_total"] == 24 * KV_BYTES_PER_PROMPT_TOKEN
    assert metrics["mean_per_observation"]["splitwise_kv_load_seconds"] == pytest.approx(0.25)
    assert "error" in result["kv_cost"]["store"]


def test_unreachable_server_is_one_clear_error(tmp_path, capsys):
    code = main(["bench", "serve", "--url", "http://127.0.0.1:9/v1", *SMALL])
    assert code == 1
    assert "cannot list models at http://127.0.0.1:9/v1/models" in capsys.readouterr().err


def test_workload_too_long_for_the_server_is_refused_before_sending(tokenizer, tmp_path, capsys):
    with serve_fake(tokenizer) as (url, fake):
        code = main(["bench", "serve", "--url", url, *SMALL, "--long-prompt-len", "2046"])
    assert code == 1 and not fake.requests
    assert "max_model_len of 2048" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--rate", "0"], "rate must be positive"), (["--concurrency", "0"], "concurrency must be")],
)
def test_impossible_load_is_refused_before_sending(tokenizer, tmp_path, capsys, flags, message):
    with serve_fake(tokenizer) as (url, fake):
        code = main(["bench", "serve", "--url", url, *SMALL, *flags])
    assert code == 1 and not fake.requests
    assert message in capsys.readouterr().err


@contextmanager
def proxied_fakes(tokenizer) -> Iterator[tuple[str, FakeVLLM, FakeVLLM]]:
    """The real proxy (every request through prefill, then decode) in front of two fakes."""
    servers = Servers()
    with (
        serve_fake(tokenizer) as (prefill_url, prefill),
        serve_fake(tokenizer) as (
            decode_url,
            decode,
        ),
    ):
        try:
            settings = ProxySettings(prefill=[prefill_url], decode=[decode_url], disagg="always")
            yield servers.serve(build_app(settings)), prefill, decode
        finally:
            servers.stop()


def test_refusals_by_admission_control_are_counted_apart_from_failures(tokenizer, tmp_path):
    """The real proxy with admission on and a one-token bound, in front of a fake that holds
    its answers: the first request is admitted and held, the other five are refused at once
    (429, Retry-After 1: the rate is not measured yet) while it is. Refusals are not failures
    (exit 0, nothing failed) and miss the SLOs over all requests, not over the admitted."""
    gate = threading.Event()
    servers = Servers()
    with serve_fake(tokenizer, Knobs(hold=gate)) as (decode_url, decode):
        settings = ProxySettings(
            decode=[decode_url], disagg="never", admission=True, admission_tokens=1
        )
        try:
            url = servers.serve(build_app(settings))
            flags = ["--workload", "fixed", "--concurrency", "6", "--warmup", "0", *LOOSE_SLOS]
            with ThreadPoolExecutor(1) as pool:
                run = pool.submit(bench, url, tmp_path, *flags)
                deadline = time.monotonic() + HANG_GUARD_S
                while value(url, "splitwise_proxy_admission_refused_total", role="decode") != 5:
                    assert not run.done(), run.result()
                    assert time.monotonic() < deadline, "the proxy never refused five"
                    time.sleep(0.02)
                assert len(decode.requests) == 1  # the admitted one, held
                gate.set()
                code, result = run.result(timeout=HANG_GUARD_S)
        finally:
            gate.set()
            servers.stop()
    assert code == 0, result["errors"]
    counts = {k: result[k] for k in ("requests", "admitted", "completed", "failed", "refused")}
    assert counts == {"requests": 6, "admitted": 1, "completed": 1, "failed": 0, "refused": 5}
    assert result["errors"] == []
    assert result["attainment"] == {"ttft": 1 / 6, "tpot": 1 / 6, "both": 1 / 6}
    assert result["attainment_admitted"] == {"ttft": 1.0, "tpot": 1.0, "both": 1.0}
    refusals = result["refusals"]
    assert refusals["statuses"] == {"429": 5} and refusals["retry_after_s"] == {"1": 5}
    latency = refusals["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    records = [r for r in result["per_request"] if r["refused"]]
    assert len(records) == 5
    for record in records:
        assert (record["status"], record["retry_after_s"]) == (429, 1.0)
        assert record["error"].startswith("HTTP 429") and record["ttft_ms"] is None
    assert max(r["refused_ms"] for r in records) == pytest.approx(latency["max"], abs=1e-3)
    (served,) = [r for r in result["per_request"] if not r["refused"]]
    assert (served["status"], served["output_tokens"], served["refused_ms"]) == (200, 8, None)


# A few seconds of each trace, small enough that nothing is clipped (Mooncake's requests come
# in batches 3 s apart: two batches, sped up).
TRACE_WINDOWS = {
    "azure-conv": ["--trace-start", "600", "--trace-duration", "2", "--length-scale", "0.1",
                   "--time-scale", "2"],
    "azure-code": ["--trace-start", "0", "--trace-duration", "1.5", "--length-scale", "0.05",
                   "--time-scale", "2"],
    "mooncake-conv": ["--trace-start", "18", "--trace-duration", "3.5", "--length-scale", "0.02",
                      "--time-scale", "0.5", "--ideal-capacity-blocks", "100"],
}  # fmt: skip
ORDER_SLACK_S = 1.0  # a hang guard on ordering, not a speed check: requests due this far apart


@pytest.mark.parametrize("trace", sorted(TRACE_WINDOWS))
def test_trace_replay_through_the_proxy_sends_the_windows_requests_in_order(
    tokenizer, tmp_path, trace
):
    flags = [*TRACE_WINDOWS[trace], "--seed", "2"]
    out = tmp_path / "trace.json"
    with proxied_fakes(tokenizer) as (url, prefill, decode):
        code = main(["bench", "serve", "--url", url, "--json", str(out), "--trace", trace,
                     *flags, "--warmup", "0", "--no-progress"])  # fmt: skip
    result = json.loads(out.read_text())
    assert code == 0, result["errors"] or result["checks"]
    # the window, from the trace file itself: rows, lengths (scaled), send times (scaled)
    settings = replay_settings(trace, flags)
    start, duration = settings.start_s, settings.duration_s
    length_scale, time_scale = settings.length_scale, settings.time_scale
    rows = [r for r in load_trace(trace) if start <= r.arrival_s < start + duration]
    assert len(rows) >= 3
    expected = {
        r.row: (
            max(1, round(r.input_len * length_scale)),
            max(1, round(r.output_len * length_scale)),
        )
        for r in rows
    }
    due = {r.row: (r.arrival_s - rows[0].arrival_s) * time_scale for r in rows}
    records = result["per_request"]
    assert [r["trace_row"] for r in records] == [r.row for r in rows]
    for record in records:
        assert (record["prompt_len"], record["output_len"]) == expected[record["trace_row"]]
        assert record["output_tokens"] == record["output_len"]
        assert record["scheduled_s"] == pytest.approx(due[record["trace_row"]], abs=1e-6)
    # what reached the engines: each request once, with its lengths, through prefill first
    replay = build_replay(settings, tokenizer, MAX_MODEL_LEN)
    by_prompt = {json.dumps(list(s.prompt) if isinstance(s.prompt, tuple) else s.prompt): s
                 for s in replay.specs}  # fmt: skip
    for fake, max_tokens in ((prefill, lambda spec: 1), (decode, lambda spec: spec.output_len)):
        got = [by_prompt[json.dumps(body["prompt"])] for body in fake.requests]
        assert sorted(s.trace_row for s in got) == sorted(expected)
        for body, spec in zip(fake.requests, got, strict=True):
            assert body["max_tokens"] == max_tokens(spec) and body["ignore_eos"]
            assert fake.prompt_tokens(body["prompt"]) == expected[spec.trace_row][0]
    # arrival order: a request due well after another reached prefill after it
    order = [by_prompt[json.dumps(body["prompt"])].trace_row for body in prefill.requests]
    decided = 0
    for i, j in itertools.combinations(range(len(order)), 2):
        early, late = order[i], order[j]
        assert due[late] > due[early] - ORDER_SLACK_S, (early, late)
        decided += abs(due[late] - due[early]) > ORDER_SLACK_S
    assert decided >= 2  # the check judged some pairs
    summary = result["trace"]
    assert (summary["length_scale"], summary["time_scale"]) == (length_scale, time_scale)
    assert result["settings"]["workload"] == "trace"
    assert result["settings"]["length_scale"] == length_scale
    assert summary["clipped"] == {"prompts": 0, "outputs": 0}
    if trace == "mooncake-conv":
        assert summary["block_tokens"] == 11  # ceil(512 x 0.02)
        assert summary["prefix_reuse"]["lru"][0]["capacity_blocks"] == 100
        assert all(isinstance(b["prompt"], list) for b in decode.requests)


def replay_settings(trace: str, flags: list[str]) -> ReplaySettings:
    values = dict(zip(flags[::2], flags[1::2], strict=True))
    return ReplaySettings(
        trace,
        length_scale=float(values["--length-scale"]),
        time_scale=float(values["--time-scale"]),
        start_s=float(values["--trace-start"]),
        duration_s=float(values["--trace-duration"]),
        seed=int(values["--seed"]),
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--rate", "2"], "drop --rate"),
        (["--length-scale", "0"], "length_scale must be"),
        (["--trace-start", "99999"], "no request of azure-conv"),
        (["--requests", "0"], "requests must be at least 1"),
        (["--time-scale", "-2"], "time_scale must be"),
        (["--ideal-capacity-blocks", "8"], "no prompt blocks"),
    ],
)
def test_impossible_replays_are_refused_before_sending(tokenizer, capsys, flags, message):
    with serve_fake(tokenizer) as (url, fake):
        code = main(["bench", "serve", "--url", url, "--trace", "azure-conv", "--no-progress",
                     *flags])  # fmt: skip
    assert code == 1 and not fake.requests
    assert message in capsys.readouterr().err
