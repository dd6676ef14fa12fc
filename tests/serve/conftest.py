"""Fixtures of the serve tests: fresh ports, a fake model folder, launches stopped at the end
(the helpers live in helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.serve.helpers import Launch, Ports, free_ports, sweep


@pytest.fixture
def ports() -> Ports:
    return Ports(*free_ports(5))


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """A folder that passes the launcher's checkpoint checks (the fake engine never reads it)."""
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def launched():
    """Collects launches so a failing test never leaves a system running."""
    started: list[Launch] = []
    yield started
    for one in started:
        one.stop()
        sweep(one.run_dir)
