"""A Hugging Face cache holding the embedded SmolLM2 and the tiny DeepSeek-V2, filled by
huggingface_hub's own download code from a stand-in Hub (tests/models/fake_hub.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from splitwise_local.models.checkpoint import DEFAULT_MODEL_NAME, prepare_default_model
from splitwise_local.models.tiny_deepseek import prepare_tiny_deepseek
from tests.models.fake_hub import FakeHub
from tests.proxy.servers import Servers
from tests.serve.helpers import free_ports

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # SHORT_NAMES["SmolLM2-135M-Instruct"]
TINY_ID = "splitwise-local/tiny-deepseek-v2"  # not on the real Hub: built here


@dataclass
class HubCache:
    home: Path  # HF_HOME; the cache is home / "hub", where huggingface_hub puts it
    sources: dict[str, Path]  # repo id -> the folder the stand-in Hub served

    @property
    def cache(self) -> Path:
        return self.home / "hub"


def unreachable_hub() -> str:
    """An endpoint nothing listens on: connections are refused at once, as offline."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def hub_env(home: Path, endpoint: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a child that finds models through `home` (HF_HOME) only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env["HF_HOME"] = str(home)
    env["HF_ENDPOINT"] = endpoint or unreachable_hub()
    env.update(extra)
    return env


def get_model(name: str, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m splitwise_local model get NAME`: finds (or downloads) it, prints its folder."""
    command = [sys.executable, "-m", "splitwise_local", "model", "get", name]
    return subprocess.run(command, env=env, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def tiny_deepseek_dir(tmp_path_factory) -> Iterator[Path]:
    """The tiny DeepSeek-V2, built in a private SPLITWISE_HOME (SmolLM2 linked in)."""
    root = tmp_path_factory.mktemp("splitwise-home")
    (root / "models").mkdir()
    (root / "models" / DEFAULT_MODEL_NAME).symlink_to(prepare_default_model())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPLITWISE_HOME", str(root))
        yield prepare_tiny_deepseek()


@pytest.fixture(scope="session")
def fake_hub_url(tiny_deepseek_dir) -> Iterator[str]:
    servers = Servers()
    hub = FakeHub({SMOLLM2_ID: prepare_default_model(), TINY_ID: tiny_deepseek_dir})
    try:
        yield servers.serve(hub.app)
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, fake_hub_url, tiny_deepseek_dir) -> HubCache:
    """Both models downloaded into a fresh HF_HOME through `model get` (so with our code)."""
    home = tmp_path_factory.mktemp("hf-home")
    for repo_id in (SMOLLM2_ID, TINY_ID):
        result = get_model(repo_id, hub_env(home, fake_hub_url), timeout=300)
        assert result.returncode == 0, result.stderr
    return HubCache(home, {SMOLLM2_ID: prepare_default_model(), TINY_ID: tiny_deepseek_dir})
