"""Fixtures shared by the real-engine tests (helpers: splitwise_testing.system)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise_local.models.checkpoint import prepare_default_model
from splitwise_testing.system import PROSE, Engine, start_system


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def prose_tokens(tokenizer) -> list[int]:
    return tokenizer(PROSE.read_text(), add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="session")
def reference(model_dir, tmp_path_factory) -> Iterator[Engine]:
    """A plain engine (no connector): what one engine alone answers."""
    system = start_system(tmp_path_factory.mktemp("reference"), model_dir, None, {"plain": "plain"})
    yield system.engines["plain"]
    system.stop()
