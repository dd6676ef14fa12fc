"""`bench proxy` runs end to end (tiny settings) and writes its headline numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx

from splitwise_bench.proxy import PEER, peer_argv, server
from splitwise_local.serve.ports import free_ports


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


def test_bench_proxy_measures_vllm_router_beside_ours(tmp_path):
    out = tmp_path / "proxy.json"
    argv = [sys.executable, "-m", "splitwise_local", "bench", "proxy", "--json", str(out)]
    argv += ["--tokens", "3", "--token-interval-ms", "5", "--single-client-requests", "2"]
    argv += ["--requests-per-client", "1", "--rounds", "1", "--peer", "vllm-router"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "Latency added: ours beside vllm-router" in done.stdout
    result = json.loads(out.read_text())
    for case in result["results"].values():
        assert case["vllm_router"]["e2e_ms"]["p50"] > 0
        assert set(case["vllm_router_added_ms"]) == set(case["added_ms"])
    c64 = result["results"]["stream_c64"]
    assert c64["vllm_router"]["ttft_ms"]["p50"] <= c64["vllm_router"]["ttft_ms"]["p99"]
    assert result["peer"]["added_p50_ms_c64"] == c64["vllm_router_added_ms"]["ttft_ms"]["p50"]
    assert result["peer"]["argv"][:2] == ["vllm-router", "--vllm-pd-disaggregation"]
    assert set(result["ratios"]) == {
        "proxy_over_direct_ttft_p50_c64",
        "vllm_router_over_direct_ttft_p50_c64",
        "proxy_over_vllm_router_ttft_p50_c64",
    }


def test_vllm_router_hands_the_fake_prefills_kv_transfer_params_to_decode(fake):
    """The peer runs the PD protocol it runs in front of vLLM: decode gets the pull address the
    prefill fake answered with, as NixlConnector's prefill would."""
    prefill, prefill_url = fake(name="prefill", tokens=2)
    decode, decode_url = fake(name="decode", tokens=2)
    ports = dict(zip([PEER, "peer_metrics"], free_ports(2), strict=True))
    url = f"http://127.0.0.1:{ports[PEER]}"
    with server(peer_argv({"prefill": prefill_url, "decode": decode_url}, ports), url):
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == " decode0 decode1"
    asked = prefill.record.requests[-1][1]
    assert asked["max_tokens"] == 1 and asked["kv_transfer_params"]["do_remote_decode"]
    handed = decode.record.requests[-1][1]["kv_transfer_params"]
    assert handed["remote_engine_id"] == "prefill" and handed["do_remote_prefill"]
