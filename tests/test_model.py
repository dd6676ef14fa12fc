"""Model folders: clear one-line errors for broken ones, atomic conversion of the default."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitwise_local.models.checkpoint import (
    ModelError,
    check_model_dir,
    prepare_default_model,
    publish_atomically,
)


def fake_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "config.json").write_text("{}"), "names no 'architectures'"),
        (lambda f: (f / "model.safetensors").unlink(), "has no weights"),
        (lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer"),
    ],
)
def test_broken_folders_are_named_with_what_is_wrong(tmp_path, damage, message):
    folder = fake_checkpoint(tmp_path / "m")
    assert check_model_dir(folder) == folder
    damage(folder)
    with pytest.raises(ModelError, match=message):
        check_model_dir(folder)


def test_a_missing_folder_is_one_line_from_the_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "splitwise_local", "model", "check", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: model folder not found: {tmp_path / 'nope'}"


def test_an_interrupted_build_leaves_nothing_that_looks_complete(tmp_path):
    destination = tmp_path / "models" / "M"

    def half_then_crash(staging: Path) -> None:
        fake_checkpoint(staging)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_atomically(half_then_crash, destination)
    assert not destination.exists()
    assert list(destination.parent.iterdir()) == []
    assert publish_atomically(fake_checkpoint, destination) == destination
    assert check_model_dir(destination) == destination


def test_the_embedded_model_is_a_servable_checkpoint_with_chat_template():
    folder = prepare_default_model()
    assert check_model_dir(folder) == folder
    assert (folder / "chat_template.jinja").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["num_key_value_heads"]) == (30, 3)


def test_model_prepare_prints_the_folder():
    result = subprocess.run(
        [sys.executable, "-m", "splitwise_local", "model", "prepare"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(prepare_default_model())
