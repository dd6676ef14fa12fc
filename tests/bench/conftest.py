"""Shared by the load generator's tests: the embedded model's real tokenizer, loaded once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from splitwise_local.models.checkpoint import prepare_default_model

    return AutoTokenizer.from_pretrained(prepare_default_model())
