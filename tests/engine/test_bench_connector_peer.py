"""`bench connector --peer example`, run small on real engines: vLLM's ExampleConnector through
the same harness as ours, so the peer comparison cannot rot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from splitwise_local.bench.connector import kv_geometry
from splitwise_local.cli import main

pytestmark = pytest.mark.engine

PROMPT_TOKENS = 300
NEW_TOKENS = 8


def test_example_connector_beside_ours(tmp_path, model_dir, capsys) -> None:
    out = tmp_path / "peer.json"
    before = set(Path("/dev/shm").glob("splitwise-example-*"))
    argv = ["bench", "connector", "--peer", "example", "--prompt-tokens", str(PROMPT_TOKENS),
            "--repeats", "1", "--new-tokens", str(NEW_TOKENS), "--no-stall",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    peer = result["peer"]
    assert peer["name"] == "example"

    # The peer's decode engine loaded KV that its prefill engine wrote: whole 128-token blocks
    # of the prompt (ExampleConnector matches block-aligned prefixes), never the full prompt.
    layers, heads, head_size = kv_geometry(model_dir)
    (tokens,) = peer["loaded_tokens"]
    assert 0 < tokens < PROMPT_TOKENS and tokens % 128 == 0
    assert peer["kv_bytes_per_request"] == tokens * layers * 2 * heads * head_size * 2
    assert peer["load_ms"] is None  # it does not time its loads
    (ours_tokens,) = result["loaded_tokens"]
    assert tokens < ours_tokens <= PROMPT_TOKENS

    # Divergence is reported per prompt for both, and the identity ratio follows from it.
    for divergence in (result["first_divergence"], peer["first_divergence"]):
        assert len(divergence) == 1 and 0 <= divergence[0] <= NEW_TOKENS
    ratios = result["ratios"]
    peer_diverged = peer["first_divergence"][0] < NEW_TOKENS
    identical = ratios["ours_identical_where_example_diverges"]
    assert identical is None if not peer_diverged else identical in (0, 1)
    ours_ms, peer_ms = (statistics.median(r["loaded_ttft_ms"]) for r in (result, peer))
    assert ratios["ttft_ours_vs_example"] == pytest.approx(ours_ms / peer_ms)
    assert ratios["kv_bytes_ours_vs_example"] > 1

    printed = capsys.readouterr().out
    assert "connector=example" in printed and "ttft_ours_vs_example = " in printed
    assert set(Path("/dev/shm").glob("splitwise-example-*")) == before  # its files were removed
