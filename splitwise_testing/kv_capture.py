"""Real KV from the embedded model, in the connector's chunk format, for serde tests and benches.

Random tensors say nothing about how well a KV compressor works: real keys have outlier
channels, real values do not, and neighbouring tokens are correlated. So the serde benchmark and
tests capture KV from SmolLM2 with transformers (no vLLM engine needed) for real prompts, and
rearrange it into the chunk layout `[num_layers, 2, num_tokens, num_heads, head_size]` that the
connector hands to a serde. The prompts are documentation and source text from Python's own
standard library: real prose and code, present on every machine, no download.

torch and transformers are imported by the functions that use them: the benchmark modules that
import this one are all imported for `bench --help`, which should not pay for them.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitwise_local.models.hub import resolve_model

if TYPE_CHECKING:
    import torch

PROMPT_SOURCES = ("argparse", "json", "textwrap", "http.server", "collections")
PROMPT_CHARS = 3000


@dataclass
class Captured:
    """One prompt's KV, plus the token ids needed to continue from it."""

    input_ids: torch.Tensor  # [num_tokens], the whole prompt
    kv: torch.Tensor  # [num_layers, 2, num_tokens, num_heads, head_size]


def prompt_texts(limit: int | None = None) -> list[str]:
    """Requests about stdlib modules: each asks the model to explain a module's docs or code."""
    texts = []
    for name in PROMPT_SOURCES[:limit]:
        module = importlib.import_module(name)
        doc = inspect.getdoc(module) or ""
        body = doc if len(doc) > PROMPT_CHARS // 2 else inspect.getsource(module)
        texts.append(f"Explain what this Python module does:\n\n{body[:PROMPT_CHARS]}")
    return texts


def load_model(path: str | Path | None = None):
    """The embedded model (or `path`) in bf16 with its tokenizer; bf16 is what vLLM serves."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(None if path is None else str(path)).folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of `text` as a single user turn of the chat template."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_dict=False
    )
    import torch

    return torch.tensor(ids, dtype=torch.long)


MLA_ROPE_DIM = 64  # DeepSeek-V2's qk_rope_head_dim: the tail of each MLA latent row


def cache_to_kv(cache) -> torch.Tensor:
    """transformers' per-layer cache -> one chunk-format tensor.

    Per-head models cache K and V as [1, heads, tokens, head_size] each: kv = 2. DeepSeek-V2's
    MLA caches the normalised latent as "keys" [1, 1, tokens, 512] and the roped k_pe as
    "values" [1, 1, tokens, 64]; joined they are vLLM's MLA row (latent then k_pe): kv = 1.
    """
    import torch

    layers = []
    for layer in cache.layers:
        keys, values = layer.keys[0], layer.values[0]
        if keys.shape[-1] != values.shape[-1]:
            layers.append(torch.cat((keys, values), dim=-1).unsqueeze(0))
        else:
            layers.append(torch.stack((keys, values)))
    return torch.stack(layers).transpose(2, 3).contiguous()


def kv_to_cache(kv: torch.Tensor):
    """The inverse of `cache_to_kv`: a DynamicCache the model can continue from."""
    from transformers import DynamicCache

    per_layer = kv.transpose(2, 3).unsqueeze(2)  # [layers, kv, 1, heads, tokens, head_size]
    if kv.shape[1] == 1:  # MLA: split each row back into latent and k_pe
        pairs = [
            (layer[0][..., :-MLA_ROPE_DIM], layer[0][..., -MLA_ROPE_DIM:]) for layer in per_layer
        ]
    else:
        pairs = [(layer[0], layer[1]) for layer in per_layer]
    return DynamicCache(ddp_cache_data=pairs)


def capture(model, input_ids: torch.Tensor) -> Captured:
    """Runs the prompt once and returns its KV in chunk layout."""
    import torch

    with torch.inference_mode():
        out = model(input_ids=input_ids.unsqueeze(0), use_cache=True)
    return Captured(input_ids=input_ids, kv=cache_to_kv(out.past_key_values))


def split_chunks(kv: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Token-major chunks as the connector stores them; the last one may be shorter."""
    return [c.contiguous() for c in kv.split(chunk_size, dim=2)]
