"""Patterns for the video memory cross-attention (memory.cross): keys are memory frames on the queries'
grid, then object-pointer tokens (the layer's MemoryLayout, geometry.py)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .grid import MaskError, MaskMod


def memory_local(radius: float = 4, cond_radius: Optional[float] = None) -> MaskMod:
    """Keep, for each query block, the key blocks of every memory frame that hold a token within `radius`
    grid tokens (Chebyshev) of the query block's tokens on the same grid: a band around the same place in
    each frame, as objects move little between frames. Conditioning (prompted) frames use `cond_radius`
    instead (None: the whole frame); every pointer token is kept. Radii are in tokens of the frame grid
    (16 px at 1024 px), not blocks: a key block that straddles two frames or the pointers is kept when any
    of its tokens is."""

    def near_in_every_memory_frame(ctx, b, h, q, k):
        layer = ctx.layer
        memory = layer.memory
        if memory is None or ctx.q is None:
            raise MaskError(f"needs the memory structure of a memory.cross layer, but {layer.name} is {layer.kind}; "
                            "use it with match: memory.cross")
        rows, cols = memory.grid
        dev = ctx.device
        r = torch.arange(rows, device=dev, dtype=torch.float32).repeat_interleave(cols)  # frame token rows
        c = torch.arange(cols, device=dev, dtype=torch.float32).repeat(rows)
        lo, hi = ctx.q.lo[:, None, :], ctx.q.hi[:, None, :] - 1  # (QB, 1, 2): the query block's token box
        gap = torch.maximum((lo[..., 0] - r).clamp(min=0) + (r - hi[..., 0]).clamp(min=0),
                            (lo[..., 1] - c).clamp(min=0) + (c - hi[..., 1]).clamp(min=0))  # (QB, T) in tokens
        near = gap <= radius + 1e-6
        cond = torch.ones_like(near) if cond_radius is None or math.isinf(cond_radius) else gap <= cond_radius + 1e-6
        parts = [cond if f else near for f in memory.frames]
        parts.append(torch.ones(near.shape[0], memory.pointer_tokens, dtype=torch.bool, device=dev))
        tokens = torch.cat(parts, dim=1)  # (QB, keys)
        bs = layer.block_size
        kb = layer.k_blocks
        tokens = torch.nn.functional.pad(tokens, (0, kb * bs - tokens.shape[1]))
        return tokens.view(1, 1, -1, kb, bs).any(dim=-1)

    return near_in_every_memory_frame
