"""Through the whole system: a prompt stored before the store is killed loads after it restarts,
from the disk tier, on real engines."""

from __future__ import annotations

import signal
import time

import pytest

from splitwise_local.config import SplitwiseConfig
from splitwise_testing.system import start_system
from tests.engine.checks import completion_tokens
from tests.engine.conftest import model_dir, prose_tokens, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.engine

CHUNK = 256


def disk_settled(system) -> dict:
    """The store's tiers once its disk writer has nothing queued (a hang guard, no timing)."""
    deadline = time.monotonic() + 60
    with system.backend() as store:
        while (tiers := store.stats()["tiers"])["disk"]["queued"]:
            assert time.monotonic() < deadline, f"the disk writer never caught up: {tiers}"
            time.sleep(0.05)
    return tiers


def test_a_prompt_stored_before_a_store_restart_loads_after_it(
    model_dir,  # noqa: F811
    prose_tokens,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # The store child reads its disk tier from the environment (the harness gives it no file).
    monkeypatch.setenv("SPLITWISE_LOCAL_DISK", str(tmp_path / "disk"))
    monkeypatch.setenv("SPLITWISE_MAX_LOCAL_DISK_SIZE", "1")
    roles = {"prefill": "prefill", "decode": "decode"}
    system = start_system(tmp_path / "run", model_dir, SplitwiseConfig(chunk_size=CHUNK), roles)
    try:
        prefill, decode = system.engines["prefill"], system.engines["decode"]
        prompt = [4000, *prose_tokens[:599]]
        prefill.complete(prompt, max_tokens=1)
        assert disk_settled(system)["disk"]["items"] >= 2  # the prompt's chunks are on disk
        before = completion_tokens(decode.complete(prompt, max_tokens=16))

        system.store_child.signal_group(signal.SIGKILL)  # its DRAM is gone with it
        system.store_child.reap()
        system.restart_store()
        hits = decode.metric("vllm:external_prefix_cache_hits_total")
        after = completion_tokens(decode.complete(prompt, max_tokens=16))

        assert decode.metric("vllm:external_prefix_cache_hits_total") - hits == 599
        assert after == before
        tiers = disk_settled(system)
        assert tiers["disk"]["hits"] >= 2 and tiers["dram"]["writes"] == tiers["disk"]["hits"]
    finally:
        system.stop()
