"""Patterns that follow the call's prompts: dense near them, a sparse background elsewhere."""

from __future__ import annotations

import torch

from .grid import MaskMod


def region_focused(radius: float = 1, background_stride: int = 4) -> MaskMod:
    """Dense around the call's point / box prompts, sparse elsewhere.

    On the image side(s) of a layer, blocks less than `radius` block extents from a prompt are "near":
    every query keeps near key blocks, near query blocks keep every key block, and every query also
    keeps a background lattice of key blocks (block-grid row + col divisible by background_stride,
    about 1 / stride of them; 0: none). Without prompts (prompts=None: an image pass that runs before any
    prompt is known) and on layers with no image side it keeps everything.
    """

    def near_prompts_and_background(ctx, b, h, q, k):
        if ctx.regions is None or (ctx.q is None and ctx.k is None):
            return (q >= 0) & (k >= 0)
        nb = ctx.regions.shape[0]
        keep = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=ctx.device)
        if ctx.k is not None:
            keep = keep | ctx.near_prompts(ctx.k, radius).view(nb, 1, 1, -1)
            if background_stride:
                lattice = ctx.k.lattice.sum(dim=-1)
                keep = keep | (torch.remainder(lattice, background_stride) == 0)[k]
        if ctx.q is not None:
            keep = keep | ctx.near_prompts(ctx.q, radius).view(nb, 1, -1, 1)
        return keep

    return near_prompts_and_background
