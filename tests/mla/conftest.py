"""A private SPLITWISE_HOME per test session, holding one tiny DeepSeek-V2 built by the session.

The embedded SmolLM2 (whose tokenizer the tiny model copies) is linked in from the real cache,
so building the tiny model here costs seconds, not SmolLM2's 30-second conversion.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitwise_local.models.checkpoint import DEFAULT_MODEL_NAME, prepare_default_model
from splitwise_local.models.tiny_deepseek import prepare_tiny_deepseek


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="session")
def home(tmp_path_factory, smollm2_dir) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("splitwise-home")
    (root / "models").mkdir()
    (root / "models" / DEFAULT_MODEL_NAME).symlink_to(smollm2_dir, target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPLITWISE_HOME", str(root))
        yield root


@pytest.fixture(scope="session")
def tiny_dir(home) -> Path:
    return prepare_tiny_deepseek()
