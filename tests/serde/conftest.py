"""Real KV for the serde tests: one prompt through the embedded model, captured once.

Loading transformers and the model takes most of the folder's time budget, so the capture is
kept in pytest's cache directory, keyed by everything that determines it (model files, prompt,
library versions); a changed input recaptures.
"""

from __future__ import annotations

import hashlib
import importlib.metadata

import pytest
import torch

from splitwise_local.bench import kv_capture
from splitwise_local.model import prepare_default_model

PROMPT_TOKENS = 300  # one full 256-token chunk and a ragged 44-token one


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """The serdes are measured per core; one thread also spares a shared test machine."""
    torch.set_num_threads(1)


def capture_key(prompt: str) -> str:
    folder = prepare_default_model()
    parts = [
        prompt,
        str(PROMPT_TOKENS),
        torch.__version__,
        importlib.metadata.version("transformers"),
    ]
    for path in sorted(folder.iterdir()):
        parts.append(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@pytest.fixture(scope="session")
def real_kv(request: pytest.FixtureRequest) -> torch.Tensor:
    """[30 layers, 2, 300 tokens, 3 heads, 64] bf16 KV of a real prompt."""
    prompt = kv_capture.prompt_texts(limit=1)[0]
    path = request.config.cache.mkdir("serde-real-kv") / f"{capture_key(prompt)}.pt"
    if path.exists():
        return torch.load(path)
    model, tokenizer = kv_capture.load_model()
    ids = kv_capture.tokenize(tokenizer, prompt)[:PROMPT_TOKENS]
    kv = kv_capture.capture(model, ids).kv
    torch.save(kv, path)
    return kv


@pytest.fixture(scope="session")
def real_chunk(real_kv: torch.Tensor) -> torch.Tensor:
    """A full 256-token chunk, as the connector produces it."""
    return kv_capture.split_chunks(real_kv, 256)[0]


@pytest.fixture(scope="session")
def ragged_chunk(real_kv: torch.Tensor) -> torch.Tensor:
    """The last, shorter chunk of a prompt (44 tokens)."""
    return kv_capture.split_chunks(real_kv, 256)[1]
