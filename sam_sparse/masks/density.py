"""Densities: the share of (query token, key token) pairs a block mask attends."""

from __future__ import annotations

from typing import Optional

import torch

from ..geometry import LayerGeometry


def block_tokens(seqlen: int, block_size: int) -> torch.Tensor:
    """(ceil(seqlen / block_size),) float64 tokens in each block; the last block may be partial."""
    nb = -(-seqlen // block_size)
    return (seqlen - torch.arange(nb, dtype=torch.float64) * block_size).clamp(max=block_size)


def pair_weights(layer: LayerGeometry) -> torch.Tensor:
    """(QB, KB) float64: share of the layer's (query token, key token) pairs in each block pair."""
    wq = block_tokens(layer.seqlen_q, layer.block_size)
    wk = block_tokens(layer.seqlen_k, layer.block_size)
    return torch.outer(wq, wk) / (layer.seqlen_q * layer.seqlen_k)


def mask_density(mask: Optional[torch.Tensor], layer: LayerGeometry) -> float:
    """Fraction of (query token, key token) pairs attended, averaged over the mask's batch and heads.

    mask: bool (B|1, H|1, QB, KB) or None (dense: 1.0). Partial last blocks weigh by their tokens, so
    a window layer (196 tokens = blocks of 128 + 68) keeping only its diagonal has density
    (128² + 68²) / 196² ≈ 0.547, not 0.5.
    """
    if mask is None:
        return 1.0
    return float((mask.double().cpu() * pair_weights(layer)).sum(dim=(-2, -1)).mean())


def head_densities(mask: Optional[torch.Tensor], layer: LayerGeometry) -> list:
    """mask_density for each head (num_heads floats), averaged over the batch."""
    if mask is None:
        return [1.0] * layer.num_heads
    per = (mask.double().cpu() * pair_weights(layer)).sum(dim=(-2, -1)).mean(dim=0)  # (H|1,)
    return per.expand(layer.num_heads).tolist()
