"""`bench connector --peer NAME`, run small on real engines: vLLM's ExampleConnector and
NixlConnector through the same harness as ours, so the peer comparison cannot rot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from splitwise_bench.connector_setups import kv_geometry
from splitwise_local.cli import main

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 300
NEW_TOKENS = 8
BLOCK = 128  # the CPU engine's block size


def run_peer(name: str, tmp_path: Path, capsys) -> tuple[dict, str]:
    out = tmp_path / "peer.json"
    argv = ["bench", "connector", "--peer", name, "--prompt-tokens", str(PROMPT_TOKENS),
            "--repeats", "1", "--new-tokens", str(NEW_TOKENS), "--no-stall",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["peer"]["name"] == name

    # Divergence is reported per prompt for both, and the identity ratio follows from it.
    peer = result["peer"]
    for divergence in (result["first_divergence"], peer["first_divergence"]):
        assert len(divergence) == 1 and 0 <= divergence[0] <= NEW_TOKENS
    ratios = result["ratios"]
    identical = ratios[f"ours_identical_where_{name}_diverges"]
    if peer["first_divergence"][0] == NEW_TOKENS:
        assert identical is None
    else:
        assert identical == (result["first_divergence"][0] == NEW_TOKENS)
    ours_ms, peer_ms = (statistics.median(r["loaded_ttft_ms"]) for r in (result, peer))
    assert ratios[f"ttft_ours_vs_{name}"] == pytest.approx(ours_ms / peer_ms)
    printed = capsys.readouterr().out
    assert f"connector={name}" in printed and f"ttft_ours_vs_{name} = " in printed
    return result, printed


def test_example_connector_beside_ours(tmp_path, model_dir, capsys) -> None:
    before = set(Path("/dev/shm").glob("splitwise-example-*"))
    result, _ = run_peer("example", tmp_path, capsys)
    peer = result["peer"]

    # The peer's decode engine loaded KV that its prefill engine wrote: whole blocks of the
    # prompt (ExampleConnector matches block-aligned prefixes), never the full prompt.
    layers, heads, head_size = kv_geometry(model_dir)
    (tokens,) = peer["loaded_tokens"]
    assert 0 < tokens < PROMPT_TOKENS and tokens % BLOCK == 0
    assert peer["kv_bytes_per_request"] == tokens * layers * 2 * heads * head_size * 2
    assert peer["load_ms"] is None  # it does not time its loads
    (ours_tokens,) = result["loaded_tokens"]
    assert tokens < ours_tokens <= PROMPT_TOKENS
    assert set(Path("/dev/shm").glob("splitwise-example-*")) == before  # its files were removed


def test_nixl_connector_beside_ours(tmp_path, model_dir, capsys) -> None:
    result, _ = run_peer("nixl", tmp_path, capsys)
    peer = result["peer"]

    # NIXL's decode engine pulled the prompt's blocks from the prefill engine (whole blocks, so
    # at least the tokens' KV), and timed the transfer.
    layers, heads, head_size = kv_geometry(model_dir)
    (tokens,) = peer["loaded_tokens"]
    assert 0 < tokens <= PROMPT_TOKENS
    per_block = BLOCK * layers * 2 * heads * head_size * 2
    assert peer["kv_bytes_per_request"] == -(-tokens // BLOCK) * per_block
    assert peer["load_ms"] > 0 and peer["load_gbps"] > 0
