"""Where blocks lie on a 2-D token grid, and how a mask_mod is run over a layer's block grid.

A *mask_mod* works like attention-gym's, one level up: it decides per (query block, key block)
instead of per token. Its signature is::

    mask_mod(ctx: BlockContext, b, h, q, k) -> bool tensor broadcastable to (B, H, QB, KB)

b, h, q, k are int64 index tensors shaped (B,1,1,1), (1,H,1,1), (1,1,QB,1), (1,1,1,KB) that cover the
whole grid (a mod may rely on that: ``random_blocks`` does). ``ctx`` says where every block lies on the
2-D image-token grid (``ctx.offset(q, k)``) and, for prompt-dependent patterns, where the prompts are.

Distances are measured in blocks, not tokens: an offset is the difference of two block centroids
divided by the extent of a full key block (its bounding box). With tiled order on a 64x64 grid and
128-token blocks a block is an 8x16 tile, so radius 1 means the 3x3 neighbouring tiles; with raster
order a block is two full rows, so radius 1 means the block above and the one below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Tuple

import torch

from ..geometry import Grid, LayerGeometry, Prompts

MaskMod = Callable[..., torch.Tensor]


class MaskError(ValueError):
    """A pattern used where it cannot work (a grid pattern on a layer without a grid on both sides,
    a tile that does not divide the grid). Policies report it with the rule's file and line."""


# ---------------------------------------------------------------------------------------------------
# Token order
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Where blocks lie on the grid
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSide:
    """Where the blocks of one side (queries or keys) of a layer lie on its image-token grid.

    Float32 tensors in grid units (one unit = one token = one 16-px patch), (row, col) order. Token
    (r, c) covers [r, r+1) x [c, c+1).
    lo, hi: (N, 2) bounding box of each block's tokens, hi exclusive.
    centre: (N, 2) mean of the block's token centres.
    unit: (2,) height and width of a full block's bounding box (block 0); offsets / unit are in blocks.
    lattice: (N, 2) int64 block-grid index round((centre - centre[0]) / unit): tile row / col for tiles.
    tokens: (N,) tokens in each block (the last one may be partial).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    centre: torch.Tensor
    unit: torch.Tensor
    lattice: torch.Tensor
    tokens: torch.Tensor


@lru_cache(maxsize=256)
def block_side(grid: Tuple[int, int], block_size: int, key_tile: Optional[Tuple[int, int]], device: str) -> BlockSide:
    """BlockSide of an h x w grid in raster (key_tile None) or th x tw tile order. Cached."""
    h, w = grid
    n = h * w
    nb = -(-n // block_size)
    pad = nb * block_size - n
    rc = token_coords(h, w, key_tile, device=device).float()  # (n, 2)
    valid = torch.ones(n, device=device)
    if pad:
        rc = torch.cat([rc, rc.new_zeros(pad, 2)])
        valid = torch.cat([valid, valid.new_zeros(pad)])
    rc = rc.view(nb, block_size, 2)
    valid = valid.view(nb, block_size, 1)
    big = float(n + 1)
    lo = torch.where(valid > 0, rc, big).amin(dim=1)
    hi = torch.where(valid > 0, rc, -big).amax(dim=1) + 1
    tokens = valid.sum(dim=(1, 2))
    centre = (rc * valid).sum(dim=1) / tokens[:, None] + 0.5
    unit = hi[0] - lo[0]
    lattice = torch.round((centre - centre[0]) / unit).long()
    return BlockSide(lo=lo, hi=hi, centre=centre, unit=unit, lattice=lattice, tokens=tokens.long())


@dataclass(frozen=True)
class BlockContext:
    """What a mask_mod may look at for one layer.

    layer: the LayerGeometry; num_heads, q_blocks, k_blocks follow from it.
    q, k: BlockSide of each side, None where that side holds prompt/output tokens (no grid).
    regions: float (B, R, 4) prompt regions as (row0, col0, row1, col1) in grid units, NaN rows are
        padding; None when the call has no prompts.
    """

    layer: LayerGeometry
    q: Optional[BlockSide]
    k: Optional[BlockSide]
    regions: Optional[torch.Tensor] = None
    device: Optional[torch.device] = None

    @property
    def self_shaped(self) -> bool:
        """Queries and keys are the same tokens in the same order, so block i of each is the same block."""
        return self.layer.same_tokens

    def _need_grids(self) -> None:
        if self.q is None or self.k is None:
            raise MaskError(
                f"needs image tokens on both sides, but {self.layer.kind} has prompt/output tokens on the "
                f"{'query' if self.q is None else 'key'} side; use it on layers with image tokens on both sides"
            )

    def offset(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(d_row, d_col): query-block centroid minus key-block centroid, in key-block extents."""
        self._need_grids()
        dr = (self.q.centre[:, 0][q] - self.k.centre[:, 0][k]) / self.k.unit[0]
        dc = (self.q.centre[:, 1][q] - self.k.centre[:, 1][k]) / self.k.unit[1]
        return dr, dc

    def lattice_offset(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(d_row, d_col) int64: query block's block-grid index minus the key block's (BlockSide.lattice)."""
        self._need_grids()
        return self.q.lattice[:, 0][q] - self.k.lattice[:, 0][k], self.q.lattice[:, 1][q] - self.k.lattice[:, 1][k]

    def prompt_gap(self, side: BlockSide) -> torch.Tensor:
        """float (B, N): for each block, the gap between its bounding box and the nearest prompt region of
        batch row b, in block extents (Chebyshev); 0 when they overlap or touch, inf with no region."""
        reg = self.regions[:, :, None, :]  # (B, R, 1, 4)
        gap_r = torch.maximum(side.lo[:, 0] - reg[..., 2], reg[..., 0] - side.hi[:, 0]).clamp(min=0) / side.unit[0]
        gap_c = torch.maximum(side.lo[:, 1] - reg[..., 3], reg[..., 1] - side.hi[:, 1]).clamp(min=0) / side.unit[1]
        gap = torch.maximum(gap_r, gap_c)  # (B, R, N); NaN for padding regions
        return torch.where(torch.isnan(gap), torch.inf, gap).amin(dim=1)

    def near_prompts(self, side: BlockSide, radius: float) -> torch.Tensor:
        """bool (B, N): blocks whose bounding box lies less than `radius` block extents from a prompt
        region of batch row b, or overlaps / touches it (radius 0: only those)."""
        gap = self.prompt_gap(side)
        return (gap == 0) | (gap < radius)


def prompt_regions(prompts: Optional[Prompts], device=None) -> Optional[torch.Tensor]:
    """Prompts -> float (B, R, 4) regions (row0, col0, row1, col1) in grid units; a point is a 0-size box.

    Non-finite points / boxes (padding) become NaN regions, which select nothing. None if no prompts.
    """
    if prompts is None or prompts.batch == 0:
        return None
    parts = []
    if prompts.points is not None:
        p = prompts.points.to(device=device, dtype=torch.float32)
        if p.dim() != 3 or p.shape[-1] != 2:
            raise ValueError(f"Prompts.points has shape {tuple(p.shape)}; expected (batch, points, 2) as (x, y)")
        y, x = p[..., 1], p[..., 0]
        parts.append(torch.stack([y, x, y, x], dim=-1))
    if prompts.boxes is not None:
        bx = prompts.boxes.to(device=device, dtype=torch.float32)
        if bx.dim() != 2 or bx.shape[-1] != 4:
            raise ValueError(f"Prompts.boxes has shape {tuple(bx.shape)}; expected (batch, 4) as (x0, y0, x1, y1)")
        x0, y0, x1, y1 = bx.unbind(-1)
        box = torch.stack([torch.minimum(y0, y1), torch.minimum(x0, x1), torch.maximum(y0, y1), torch.maximum(x0, x1)], -1)
        parts.append(box[:, None, :])
    if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
        raise ValueError(f"Prompts.points has batch {parts[0].shape[0]} but Prompts.boxes has {parts[1].shape[0]}")
    reg = torch.cat(parts, dim=1)
    return torch.where(torch.isfinite(reg).all(dim=-1, keepdim=True), reg, torch.nan)


def block_context(layer: LayerGeometry, prompts: Optional[Prompts] = None, device=None) -> BlockContext:
    """The BlockContext of a layer (block positions from its grids, block_size and key_tile)."""
    device = torch.device(device if device is not None else "cpu")

    def side(grid):
        if grid is None:
            return None
        try:
            return block_side(tuple(grid), layer.block_size, layer.key_tile, str(device))
        except ValueError as e:  # a key_tile that does not divide this grid
            raise MaskError(f"layer {layer.name}: {e}") from None

    q_side = side(layer.q_grid)
    if q_side is not None and layer.k_grid is not None and tuple(layer.q_grid) != tuple(layer.k_grid):
        # Queries on a coarser grid than the keys (Hiera's pooled queries): measure them in key-grid units,
        # a query token covering (k / q) x (k / q) key tokens, so that offsets compare like places.
        q_side = _scaled(q_side, (layer.k_grid[0] / layer.q_grid[0], layer.k_grid[1] / layer.q_grid[1]))
    return BlockContext(layer, q_side, side(layer.k_grid), prompt_regions(prompts, device), device)


def _scaled(side: BlockSide, factor: Tuple[float, float]) -> BlockSide:
    """A BlockSide in units `factor` times finer (rows, cols); lattice and token counts stay as they are."""
    f = torch.tensor(factor, device=side.lo.device)
    return BlockSide(lo=side.lo * f, hi=side.hi * f, centre=side.centre * f, unit=side.unit * f,
                     lattice=side.lattice, tokens=side.tokens)


def evaluate(mod: MaskMod, ctx: BlockContext) -> torch.Tensor:
    """Run a mask_mod over a layer's whole block grid.

    Returns bool (B|1, H|1, QB, KB) on ctx.device: B = number of prompt batch rows when the mod used
    the prompts, else 1; H = num_heads when the mod varies by head, else 1.
    """
    layer = ctx.layer
    nb = ctx.regions.shape[0] if ctx.regions is not None else 1
    dev = ctx.device
    b = torch.arange(nb, device=dev).view(-1, 1, 1, 1)
    h = torch.arange(layer.num_heads, device=dev).view(1, -1, 1, 1)
    q = torch.arange(layer.q_blocks, device=dev).view(1, 1, -1, 1)
    k = torch.arange(layer.k_blocks, device=dev).view(1, 1, 1, -1)
    out = torch.as_tensor(mod(ctx, b, h, q, k), dtype=torch.bool, device=dev)
    out = out.reshape((1,) * (4 - out.dim()) + tuple(out.shape))
    return out.expand(out.shape[0], out.shape[1], layer.q_blocks, layer.k_blocks)
