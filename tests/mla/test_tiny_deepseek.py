"""The tiny DeepSeek-V2: built once from a seed, MLA with a 576-wide latent, MoE, SmolLM2's
tokenizer, loadable by transformers, and cached atomically under SPLITWISE_HOME."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from splitwise_local.models.checkpoint import (
    ModelError,
    check_model_dir,
    models_dir,
    publish_atomically,
)
from splitwise_local.models.tiny_deepseek import (
    NAME,
    RECIPE,
    TOKENIZER_FILES,
    build_tiny_deepseek,
    prepare_tiny_deepseek,
    tiny_deepseek_dir,
)


def weights_hash(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_the_checkpoint_is_a_servable_deepseek_v2_with_mla_and_moe(tiny_dir, home):
    assert check_model_dir(tiny_dir) == tiny_dir
    assert tiny_dir.parent == models_dir() == home / "models"
    assert tiny_dir.name.startswith(f"{NAME}-")
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV2ForCausalLM"]
    assert config["kv_lora_rank"] + config["qk_rope_head_dim"] == 576  # the CPU backends' width
    assert config["q_lora_rank"] is None
    assert config["n_routed_experts"] > config["num_experts_per_tok"] >= 2
    assert config["n_shared_experts"] >= 1
    assert 1 <= config["first_k_dense_replace"] < config["num_hidden_layers"]
    assert config["n_group"] == config["topk_group"] == 1  # vLLM's router asserts both are set
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["dtype"] == "bfloat16"


def test_tokenizer_and_chat_template_are_smollm2s(tiny_dir, smollm2_dir):
    from transformers import AutoTokenizer

    for name in TOKENIZER_FILES:
        assert (tiny_dir / name).read_bytes() == (smollm2_dir / name).read_bytes(), name
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    config = json.loads((tiny_dir / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    assert tokenizer.eos_token_id == config["eos_token_id"]


def test_transformers_loads_it_and_decodes_greedily(tiny_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    assert model.dtype == torch.bfloat16
    dense, moe = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert not hasattr(dense, "experts")
    assert hasattr(moe, "experts") and hasattr(moe, "shared_experts")
    attention = model.model.layers[0].self_attn
    gain = attention.q_proj.weight.float().std() / attention.kv_a_proj_with_mqa.weight.float().std()
    assert gain.item() == pytest.approx(RECIPE.query_gain, rel=0.05)
    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        first = model.generate(prompt, max_new_tokens=8, do_sample=False)
        again = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert first.shape == (1, 14)
    assert torch.equal(first, again)


def test_same_seed_same_weights_other_seed_other_weights(tiny_dir, smollm2_dir, tmp_path):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_deepseek(tmp_path / "again", RECIPE, smollm2_dir)
    assert torch.equal(torch.rand(3), expected_draw), "the build moved the caller's RNG"
    build_tiny_deepseek(tmp_path / "seed1", replace(RECIPE, seed=1), smollm2_dir)
    assert weights_hash(tmp_path / "again") == weights_hash(tiny_dir)
    assert weights_hash(tmp_path / "seed1") != weights_hash(tiny_dir)


def test_prepare_builds_once_and_a_new_recipe_gets_a_new_folder(tiny_dir):
    built = (tiny_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_tiny_deepseek() == tiny_dir
    assert (tiny_dir / "model.safetensors").stat().st_mtime_ns == built
    other = tiny_deepseek_dir(replace(RECIPE, query_gain=1.0))
    assert other != tiny_dir and other.parent == tiny_dir.parent


def test_a_tokenizer_folder_without_tokenizer_fails_clearly_and_leaves_nothing(
    tmp_path, smollm2_dir
):
    broken = tmp_path / "no-tokenizer"
    broken.mkdir()
    (broken / "config.json").write_bytes((smollm2_dir / "config.json").read_bytes())
    destination = tmp_path / "models" / "tiny"
    with pytest.raises(ModelError, match=r"lacks tokenizer\.json, tokenizer_config\.json"):
        publish_atomically(lambda tmp: build_tiny_deepseek(tmp, RECIPE, broken), destination)
    assert list(destination.parent.iterdir()) == []


def test_the_cli_prints_the_folder(tiny_dir, home):
    result = subprocess.run(
        [sys.executable, "-m", "splitwise_local", "model", "tiny-deepseek-v2"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SPLITWISE_HOME": str(home)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tiny_dir}\n"
