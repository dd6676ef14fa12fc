"""A tiny DeepSeek-V2 (MLA + MoE) checkpoint with random weights, built here, never downloaded.

DeepSeek-V2-Lite is too large to fetch on a CPU-only machine, but its architecture is what the
connector's MLA path must carry. This module builds the same architecture at toy size with
transformers (`DeepseekV2Config` + `DeepseekV2ForCausalLM`) from a fixed seed, saves it in bf16
with SmolLM2's tokenizer and chat template, and caches it beside the embedded model. The folder
name carries a digest of the architecture and recipe, so a changed recipe builds a new folder
instead of serving a stale one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from splitwise_local.models.checkpoint import (
    ModelError,
    check_model_dir,
    models_dir,
    prepare_default_model,
    publish_atomically,
)
from splitwise_local.progress import library_bars

NAME = "tiny-deepseek-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Both MLA backends of vLLM's CPU platform accept only a 576-wide latent per token
# (kv_lora_rank + qk_rope_head_dim): 512 + 64, as in DeepSeek-V2 itself.
ARCHITECTURE = {
    "hidden_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": None,  # DeepSeek-V2-Lite projects queries directly
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 32,
    "v_head_dim": 32,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,  # layer 0 dense, the others MoE, as in DeepSeek-V2
    # vLLM always routes through grouped top-k and asserts both are set; one group = plain top-k.
    "n_group": 1,
    "topk_group": 1,
    # DeepSeek-V2-Lite's own RoPE (YaRN, 4k -> 160k). It also keeps vLLM 0.32 on the CPU off its
    # compiled rotary kernel, which rotates MLA's strided [tokens, heads, 64] queries wrongly
    # (plain RoPE does go through it); the YaRN class runs in PyTorch.
    "max_position_embeddings": 163840,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class TinyDeepseekRecipe:
    """How the random weights are drawn, chosen by measuring greedy decoding in vLLM on the CPU.

    Random weights give near-flat logits; in bf16 about 5% of greedy steps are exact ties, and
    the last prompt token's logits computed in a 1-token (decode) forward instead of the full
    prefill flip a tie now and then. A small `initializer_range` keeps that numerical noise near
    one bf16 step (0.02 amplified it 5x, 0.05 chaotically). `query_gain` multiplies the query
    projections: otherwise every attention score is near 0, attention is a plain average and
    corrupted or misplaced latents (or their RoPE part) hardly change the output; 50 makes it
    pick out tokens, as a trained model's does, without raising the flip rate.
    """

    seed: int = 0
    initializer_range: float = 0.01
    query_gain: float = 50.0

    def digest(self) -> str:
        text = json.dumps({"recipe": asdict(self), "architecture": ARCHITECTURE}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


RECIPE = TinyDeepseekRecipe()


def tiny_deepseek_dir(recipe: TinyDeepseekRecipe = RECIPE) -> Path:
    return models_dir() / f"{NAME}-{recipe.digest()}"


def tiny_deepseek_config(recipe: TinyDeepseekRecipe, tokenizer_dir: Path):
    """The DeepseekV2Config, with special token ids taken from the tokenizer's own config."""
    from transformers import DeepseekV2Config

    tokens = json.loads((tokenizer_dir / "config.json").read_text())
    return DeepseekV2Config(
        **ARCHITECTURE,
        vocab_size=tokens["vocab_size"],
        bos_token_id=tokens.get("bos_token_id"),
        eos_token_id=tokens.get("eos_token_id"),
        pad_token_id=tokens.get("pad_token_id"),
        initializer_range=recipe.initializer_range,
        dtype="bfloat16",
    )


def build_tiny_deepseek(destination: Path, recipe: TinyDeepseekRecipe, tokenizer_dir: Path) -> None:
    """Writes the checkpoint (bf16 safetensors, config, tokenizer, chat template) into a folder."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    missing = [name for name in TOKENIZER_FILES if not (tokenizer_dir / name).is_file()]
    if missing:
        raise ModelError(f"{tokenizer_dir} lacks {', '.join(missing)}: no tokenizer to copy")
    config = tiny_deepseek_config(recipe, tokenizer_dir)
    # transformers draws initial weights from the global RNG; seed a fork, leave the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = DeepseekV2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(recipe.query_gain)
    with library_bars():
        model.to(torch.bfloat16).save_pretrained(destination)
    for name in TOKENIZER_FILES:
        shutil.copy2(tokenizer_dir / name, destination / name)


def prepare_tiny_deepseek(recipe: TinyDeepseekRecipe = RECIPE) -> Path:
    """Returns the cached checkpoint folder, building it on first use."""
    destination = tiny_deepseek_dir(recipe)
    if destination.is_dir():
        return check_model_dir(destination)
    tokenizer_dir = prepare_default_model()
    try:
        return publish_atomically(
            lambda tmp: build_tiny_deepseek(tmp, recipe, tokenizer_dir), destination
        )
    except ImportError as exc:
        raise ModelError(f"building {NAME} needs transformers with DeepSeek-V2: {exc}") from None
