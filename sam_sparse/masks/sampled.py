"""Patterns that keep blocks regardless of distance: seeded random blocks and attention sinks."""

from __future__ import annotations

import zlib

import torch

from ..geometry import LayerGeometry
from .grid import MaskMod
from .local import keep_count


def sink(blocks: int = 1) -> MaskMod:
    """Keep the first `blocks` key blocks for every query (attention sinks / global context)."""

    def first_key_blocks(ctx, b, h, q, k):
        return (k < blocks) & (q >= 0)

    return first_key_blocks


def _layer_seed(seed: int, layer: LayerGeometry) -> int:
    # Stable across runs and processes (unlike hash()): each layer gets its own draw.
    return (seed * 1_000_003 + zlib.crc32(layer.name.encode())) % (2**63)


def random_blocks(density: float = 0.5, seed: int = 0) -> MaskMod:
    """Keep round(density * KB) random key blocks per query block and head (at least one), seeded by
    (seed, layer name). In self-attention-shaped layers the own block is always among them, so the
    density is on target and the diagonal guard adds nothing."""

    def random_blocks_per_head(ctx, b, h, q, k):
        nh, qb, kb = h.shape[1], q.shape[2], k.shape[3]
        gen = torch.Generator().manual_seed(_layer_seed(seed, ctx.layer))
        scores = torch.rand(nh, qb, kb, generator=gen)
        if ctx.self_shaped:
            d = torch.arange(min(qb, kb))
            scores[:, d, d] = 2.0  # above any uniform draw: picked first
        top = scores.topk(keep_count(density, kb), dim=-1).indices
        keep = torch.zeros(nh, qb, kb, dtype=torch.bool).scatter_(-1, top, True)
        return keep[None].to(ctx.device)

    return random_blocks_per_head
