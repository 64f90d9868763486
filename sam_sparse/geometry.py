"""What a mask policy needs to know about one attention layer, and the token orders it may use.

This module is the contract between the patcher (which describes each SAM attention module it finds)
and the mask policies (which turn that description into a block mask). It knows nothing of Triton or
of segment-anything's classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# Layer kinds, in the order they appear in a SAM forward pass.
LAYER_KINDS = (
    "encoder.global",  # image encoder block with window_size == 0: all 4096 tokens attend to all
    "encoder.window",  # image encoder block inside 14x14 windows (each window is one batch row)
    "decoder.self",  # mask decoder: prompt/output tokens attend to themselves
    "decoder.token_to_image",  # tokens (queries) attend to image tokens (keys)
    "decoder.image_to_token",  # image tokens (queries) attend to tokens (keys)
    "decoder.final_token_to_image",  # the last token-to-image attention after the two-way blocks
)

TOKEN_ORDERS = ("raster", "tiles")

Grid = Tuple[int, int]


@dataclass(frozen=True)
class LayerGeometry:
    """One attention layer as a mask policy sees it.

    name: the module's qualified name in the model (``image_encoder.blocks.2.attn``).
    kind: one of LAYER_KINDS.
    layer_index: position among layers of the same kind (0, 1, ...), for per-layer rules.
    num_heads: attention heads of the layer.
    seqlen_q, seqlen_k: tokens on each side (per batch row; for encoder.window one window).
    q_grid, k_grid: (rows, cols) of the image-token grid when that side is image tokens, else None.
        For encoder.window this is the window (14, 14); for decoder image sides the embedding grid (64, 64).
    block_size: mask granularity in tokens; the block mask is
        (ceil(seqlen_q / block_size), ceil(seqlen_k / block_size)).
    key_tile: None when image tokens are in raster order; (th, tw) when they are grouped in th x tw
        tiles, tiles in raster order (see tile_permutation). Queries and keys of an image side use
        the same order.
    """

    name: str
    kind: str
    num_heads: int
    seqlen_q: int
    seqlen_k: int
    q_grid: Optional[Grid] = None
    k_grid: Optional[Grid] = None
    block_size: int = 128
    key_tile: Optional[Grid] = None
    layer_index: int = 0

    def __post_init__(self):
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"LayerGeometry.kind={self.kind!r}: expected one of {', '.join(LAYER_KINDS)}")
        for side, grid, n in (("q", self.q_grid, self.seqlen_q), ("k", self.k_grid, self.seqlen_k)):
            if grid is not None and grid[0] * grid[1] != n:
                raise ValueError(f"LayerGeometry.{side}_grid={grid} does not hold seqlen_{side}={n} tokens")

    @property
    def q_blocks(self) -> int:
        return -(-self.seqlen_q // self.block_size)

    @property
    def k_blocks(self) -> int:
        return -(-self.seqlen_k // self.block_size)


def tile_permutation(h: int, w: int, th: int, tw: int, device=None) -> torch.Tensor:
    """Token order for grouping an h x w raster grid into th x tw tiles.

    Returns perm (h*w,) int64 such that ``x_tiled = x_raster[..., perm, :]``: position p of the tiled
    sequence holds raster token perm[p]. Tiles are in raster order over the (h/th, w/tw) tile grid and
    tokens are in raster order inside each tile. The inverse is ``torch.argsort(perm)``.
    """
    if h % th or w % tw:
        raise ValueError(f"tile ({th}, {tw}) does not divide the grid ({h}, {w})")
    rows = torch.arange(h, device=device).view(h // th, th, 1, 1)
    cols = torch.arange(w, device=device).view(1, 1, w // tw, tw)
    # (tile_row, in_row, tile_col, in_col) -> (tile_row, tile_col, in_row, in_col)
    raster = (rows * w + cols).permute(0, 2, 1, 3)
    return raster.reshape(-1)


def token_coords(h: int, w: int, key_tile: Optional[Grid] = None, device=None) -> torch.Tensor:
    """(h*w, 2) int64 (row, col) of each position of a sequence in raster or tiled order."""
    idx = torch.arange(h * w, device=device)
    if key_tile is not None:
        idx = tile_permutation(h, w, key_tile[0], key_tile[1], device=device)
    return torch.stack((idx // w, idx % w), dim=1)


def default_key_tile(grid: Grid, block_size: int) -> Optional[Grid]:
    """The most compact th x tw tile with th * tw == block_size that divides the grid, or None.

    Prefers square, then wider-than-tall (rows of keys are contiguous in memory for the bias).
    """
    h, w = grid
    best = None
    tw = 1
    while tw <= block_size:
        if block_size % tw == 0:
            th = block_size // tw
            if h % th == 0 and w % tw == 0 and th <= tw:
                score = tw / th
                if best is None or score < best[0]:
                    best = (score, (th, tw))
        tw *= 2
    return None if best is None else best[1]


@dataclass(frozen=True)
class Prompts:
    """The current call's prompts, in image-token grid units (one unit = one 16-px patch at 1024 px).

    points: float (B, P, 2) as (x=col, y=row), or None; boxes: float (B, 4) as (x0, y0, x1, y1), or None.
    Mask policies that focus on a region (region_focused) read these; all others ignore them.
    """

    points: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        t = self.points if self.points is not None else self.boxes
        return 0 if t is None else t.shape[0]
