"""Real KV for the serde tests: one prompt through the embedded model, captured once a session.

Computed, not cached on disk: CI starts from a clean clone, and a stale capture could hide a
change in the model or in transformers.
"""

from __future__ import annotations

import pytest
import torch

from splitwise_testing import kv_capture

PROMPT_TOKENS = 300  # one full 256-token chunk and a ragged 44-token one


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """The serdes are measured per core; one thread also spares a shared test machine."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def real_kv() -> torch.Tensor:
    """[30 layers, 2, 300 tokens, 3 heads, 64] bf16 KV of a real prompt (a few seconds)."""
    prompt = kv_capture.prompt_texts(limit=1)[0]
    model, tokenizer = kv_capture.load_model()
    ids = kv_capture.tokenize(tokenizer, prompt)[:PROMPT_TOKENS]
    return kv_capture.capture(model, ids).kv


@pytest.fixture(scope="session")
def real_chunk(real_kv: torch.Tensor) -> torch.Tensor:
    """A full 256-token chunk, as the connector produces it."""
    return kv_capture.split_chunks(real_kv, 256)[0]


@pytest.fixture(scope="session")
def ragged_chunk(real_kv: torch.Tensor) -> torch.Tensor:
    """The last, shorter chunk of a prompt (44 tokens)."""
    return kv_capture.split_chunks(real_kv, 256)[1]
