"""Patterns that keep blocks by their place on the 2-D grid: dense, own block, neighbourhoods, axes,
lattices, nearest-k and per-head-group radii. All but dense and diagonal need a grid on both sides."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .grid import MaskError, MaskMod

_EPS = 1e-6  # slack for float distances that are whole numbers of blocks


def _distance(dr: torch.Tensor, dc: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "chebyshev":  # square neighbourhood: radius 1 = 3x3 blocks
        return torch.maximum(dr.abs(), dc.abs())
    if metric == "manhattan":  # diamond: radius 1 = the 4 edge neighbours
        return dr.abs() + dc.abs()
    return torch.hypot(dr, dc)  # euclidean: disc


def keep_count(density: float, n: int) -> int:
    """Blocks per row for a target density: at least one."""
    return max(1, min(n, round(density * n)))


def dense() -> MaskMod:
    """Keep every block."""

    def all_blocks(ctx, b, h, q, k):
        return (q >= 0) & (k >= 0)

    return all_blocks


def diagonal() -> MaskMod:
    """Keep each query block's own block (self-attention-shaped layers)."""

    def own_block(ctx, b, h, q, k):
        return q == k

    return own_block


def local2d(radius: float = 1, metric: str = "chebyshev") -> MaskMod:
    """Keep key blocks within `radius` blocks of the query block on the 2-D token grid."""

    def keys_within_radius(ctx, b, h, q, k):
        dr, dc = ctx.offset(q, k)
        return _distance(dr, dc, metric) <= radius + _EPS

    return keys_within_radius


def axial(width: int = 0) -> MaskMod:
    """Keep key blocks in the query block's block row or block column (± width). Raster blocks span
    whole rows, so every block shares the column: axial is dense there; use token_order: tiles."""

    def same_block_row_or_column(ctx, b, h, q, k):
        dr, dc = ctx.offset(q, k)
        return (dr.abs() < width + 0.5) | (dc.abs() < width + 0.5)

    return same_block_row_or_column


def dilated(stride: int = 2, radius: Optional[int] = None) -> MaskMod:
    """Keep key blocks whose offset from the query block is a multiple of `stride` blocks on both axes
    (a lattice through the query block, as dilated neighbourhood attention), within `radius` lattice
    steps if given."""

    def on_dilated_lattice(ctx, b, h, q, k):
        dr, dc = ctx.offset(q, k)
        ri, ci = dr.round(), dc.round()
        keep = (torch.remainder(ri, stride) == 0) & (torch.remainder(ci, stride) == 0)
        if radius is not None:
            keep = keep & (torch.maximum(ri.abs(), ci.abs()) <= radius * stride)
        return keep

    return on_dilated_lattice


def nearest(density: float = 0.5) -> MaskMod:
    """Keep the round(density * KB) key blocks nearest to the query block (euclidean, in blocks; ties
    go to the lower key index): an exact density with a local shape."""

    def nearest_key_blocks(ctx, b, h, q, k):
        dr, dc = ctx.offset(q, k)
        dist = torch.hypot(dr, dc).expand(1, 1, q.shape[2], k.shape[3])
        order = torch.argsort(dist, dim=-1, stable=True)[..., : keep_count(density, k.shape[3])]
        return torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, order, True)

    return nearest_key_blocks


def hierarchical(radii: Sequence = (1, 2, 4, "all"), metric: str = "chebyshev") -> MaskMod:
    """Multi-scale local attention: heads split into len(radii) contiguous groups (head h in group
    h * len(radii) // num_heads); group g keeps key blocks within radii[g] ("all": every block)."""
    table = [math.inf if r == "all" else float(r) for r in radii]

    def radius_per_head_group(ctx, b, h, q, k):
        group = h * len(table) // h.shape[1]
        r = torch.tensor(table, device=h.device)[group]  # (1, H, 1, 1)
        dr, dc = ctx.offset(q, k)
        return _distance(dr, dc, metric) <= r + _EPS

    return radius_per_head_group


def relative_blocks(offsets: Sequence = ((0, 0),), sinks: Sequence = ()) -> MaskMod:
    """Keep key blocks at the given block-grid offsets from the query block, and the `sinks` key blocks
    for every query. offsets: (d_row, d_col) pairs of query block minus key block in BlockSide.lattice
    units (tiles of a tiled order; in raster order blocks stack in rows, so d_col is 0). What
    calibration writes: sets that move with the query, so they transfer to new images. A sink past the
    layer's key blocks raises MaskError."""
    table = torch.tensor([tuple(o) for o in offsets], dtype=torch.long).reshape(-1, 2)
    sink_ids = torch.tensor(list(sinks), dtype=torch.long)

    def offsets_and_sinks(ctx, b, h, q, k):
        if len(sink_ids) and int(sink_ids.max()) >= ctx.layer.k_blocks:
            raise MaskError(f"sinks lists key block {int(sink_ids.max())}, but layer {ctx.layer.name} has "
                            f"{ctx.layer.k_blocks} key blocks (0..{ctx.layer.k_blocks - 1})")
        dr, dc = ctx.lattice_offset(q, k)  # (1, 1, QB, KB)
        t = table.to(dr.device)
        keep = ((dr[..., None] == t[:, 0]) & (dc[..., None] == t[:, 1])).any(dim=-1)
        if len(sink_ids):
            keep = keep | (k[..., None] == sink_ids.to(k.device)).any(dim=-1)
        return keep

    return offsets_and_sinks
