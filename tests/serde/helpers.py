"""Shared test data and measures for the serde tests."""

from __future__ import annotations

import torch


def mla_chunk(tokens: int = 40, layers: int = 3, seed: int = 0) -> torch.Tensor:
    """An MLA-shaped chunk [layers, 1, tokens, 1, 576]: a normalised 512-dim latent and 64 RoPE
    dims on a much larger scale (there is no MLA model here, so the values are synthetic)."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(layers, 1, tokens, 1, 512, generator=gen)
    rope = 20 * torch.randn(layers, 1, tokens, 1, 64, generator=gen)
    return torch.cat((latent, rope), dim=-1).to(torch.bfloat16)


def relative_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    diff = (decoded.float() - original.float()).norm()
    return float(diff / original.float().norm())
