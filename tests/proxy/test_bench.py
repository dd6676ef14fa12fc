"""`bench proxy` runs end to end (tiny settings) and writes its headline numbers."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_proxy_writes_its_headline_numbers(tmp_path):
    out = tmp_path / "proxy.json"
    argv = [sys.executable, "-m", "splitwise_local", "bench", "proxy", "--json", str(out)]
    argv += ["--tokens", "3", "--token-interval-ms", "5", "--single-client-requests", "3"]
    argv += ["--requests-per-client", "1", "--rounds", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Latency added by the proxy" in done.stdout
    result = json.loads(out.read_text())
    for key in ("added_p50_ms_c64", "added_p99_ms_c64", "chunks_held_back_c64", "machine"):
        assert key in result
    assert set(result["results"]) == {"whole_c1", "stream_c1", "whole_c64", "stream_c64"}
    assert result["results"]["stream_c64"]["requests"] == 64
    proxied = result["results"]["stream_c64"]["proxy"]
    assert proxied["ttft_ms"]["p50"] <= proxied["ttft_ms"]["p99"] <= proxied["ttft_ms"]["max"]


def test_bench_proxy_with_tracing_compares_a_traced_proxy_to_the_untraced_one(tmp_path):
    out = tmp_path / "proxy.json"
    argv = [sys.executable, "-m", "splitwise_local", "bench", "proxy", "--json", str(out)]
    argv += ["--tokens", "3", "--token-interval-ms", "5", "--single-client-requests", "3"]
    argv += ["--requests-per-client", "1", "--rounds", "2", "--tracing"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Latency tracing adds to the proxy" in done.stdout
    result = json.loads(out.read_text())
    c64 = result["results"]["stream_c64"]
    assert c64["traced"]["ttft_ms"]["p50"] <= c64["traced"]["ttft_ms"]["p99"]
    assert len(c64["tracing_added_ms"]["ttft_ms"]["p50_per_round"]) == 2
    assert set(result["ratios"]) == {
        "proxy_over_direct_ttft_p50_c64",
        "traced_over_direct_ttft_p50_c64",
        "traced_over_untraced_ttft_p50_c64",
    }
    tracing = result["tracing"]
    assert tracing["added_p50_ms_c64"] == c64["tracing_added_ms"]["ttft_ms"]["p50"]
    # Every traced request reached the receiver: five proxy spans each (route, admission,
    # prefill, decode and the request's own), warm-up requests included.
    requests = sum(case["requests"] + case["clients"] * 2 for case in result["results"].values())
    assert tracing["spans_received"] == 5 * requests
