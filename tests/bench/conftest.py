"""Shared by the benchmarks' tests: the embedded model's real tokenizer, loaded once, and the
proxy tests' in-process servers (`servers`)."""

from __future__ import annotations

import pytest

from tests.proxy.conftest import servers  # noqa: F401 (a shared fixture)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from splitwise_local.models.checkpoint import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model())
