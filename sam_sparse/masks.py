"""Block-mask patterns: small named mask factories, composable with and_masks / or_masks.

A *mask_mod* here works like attention-gym's, one level up: it decides per (query block, key block)
instead of per token. Its signature is::

    mask_mod(ctx: BlockContext, b, h, q, k) -> bool tensor broadcastable to (B, H, QB, KB)

b, h, q, k are int64 index tensors shaped (B,1,1,1), (1,H,1,1), (1,1,QB,1), (1,1,1,KB) that cover the
whole grid (a mod may rely on that: ``random`` does). ``ctx`` says where every block lies on the 2-D
image-token grid (``ctx.offset(q, k)``) and, for prompt-dependent patterns, where the prompts are.

Distances are measured in blocks, not tokens: an offset is the difference of two block centroids
divided by the extent of a full key block (its bounding box). With ``token_order: tiles`` on a 64x64
grid and 128-token blocks a block is an 8x16 tile, so radius 1 means the 3x3 neighbouring tiles; with
raster order a block is two full rows, so radius 1 means the block above and the one below.

Each YAML pattern name maps to a factory in PATTERNS, which also declares and validates its params.
"""

from __future__ import annotations

import difflib
import math
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from .geometry import LayerGeometry, Prompts, token_coords

MaskMod = Callable[..., torch.Tensor]

_EPS = 1e-6  # slack for float distances that are whole numbers of blocks


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def _format_path(path: Sequence) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class PolicyError(ValueError):
    """An invalid mask policy, pattern or parameter.

    One line: ``<source>:<line>: <field>: <what is wrong>; <what is accepted>``, where the parts that
    are unknown are left out. Attributes: reason, path (tuple of keys / list indices from the top of
    the policy, e.g. ("rules", 0, "params", "radius")), source (file or "<dict>"), line (1-based).
    """

    def __init__(self, reason: str, *, path: Sequence = (), source: Optional[str] = None, line: Optional[int] = None):
        self.reason = " ".join(str(reason).split())  # always one line (YAML errors bring newlines)
        self.path = tuple(path)
        self.source = source
        self.line = line
        super().__init__(self._message())

    @property
    def field(self) -> str:
        return _format_path(self.path)

    def _message(self) -> str:
        where = ""
        if self.source is not None:
            where = f"{self.source}:{self.line}: " if self.line is not None else f"{self.source}: "
        field = f"{self.field}: " if self.path else ""
        return f"{where}{field}{self.reason}"

    def prefixed(self, prefix: Sequence) -> "PolicyError":
        """The same error with its path under ``prefix`` (used while descending into a policy)."""
        return PolicyError(self.reason, path=tuple(prefix) + self.path, source=self.source, line=self.line)


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {v!r}"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    if isinstance(v, str):
        return f"the string {v!r}"
    return f"{type(v).__name__} {v!r}"


def unknown_key_message(key: Any, accepted: Sequence[str], what: str = "key") -> str:
    """'unknown key 'radious' (did you mean 'radius'?); accepted keys: a, b' ."""
    hint = difflib.get_close_matches(str(key), accepted, n=1)
    did = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {what} {key!r}{did}; accepted {what}s: {', '.join(accepted)}"


def reject_unknown_keys(d: Mapping, accepted: Sequence[str]) -> None:
    """PolicyError at the first key of d that is not accepted (its path is that key)."""
    for key in d:
        if key not in accepted:
            raise PolicyError(unknown_key_message(key, accepted), path=(key,))


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


SELF_KINDS = ("encoder.global", "encoder.window", "decoder.self")


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
        return self.layer.kind in SELF_KINDS and self.layer.seqlen_q == self.layer.seqlen_k

    def offset(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(d_row, d_col): query-block centroid minus key-block centroid, in key-block extents."""
        if self.q is None or self.k is None:
            raise PolicyError(
                f"needs image tokens on both sides, but {self.layer.kind} has prompt/output tokens on the "
                f"{'query' if self.q is None else 'key'} side; use it on encoder.global or encoder.window layers"
            )
        dr = (self.q.centre[:, 0][q] - self.k.centre[:, 0][k]) / self.k.unit[0]
        dc = (self.q.centre[:, 1][q] - self.k.centre[:, 1][k]) / self.k.unit[1]
        return dr, dc

    def near_prompts(self, side: BlockSide, radius: float) -> torch.Tensor:
        """bool (B, N): blocks whose bounding box lies less than `radius` block extents from a prompt
        region of batch row b, or overlaps / touches it (radius 0: only those)."""
        reg = self.regions[:, :, None, :]  # (B, R, 1, 4)
        gap_r = torch.maximum(side.lo[:, 0] - reg[..., 2], reg[..., 0] - side.hi[:, 0]).clamp(min=0) / side.unit[0]
        gap_c = torch.maximum(side.lo[:, 1] - reg[..., 3], reg[..., 1] - side.hi[:, 1]).clamp(min=0) / side.unit[1]
        gap = torch.maximum(gap_r, gap_c)  # (B, R, N); NaN for padding regions, and NaN compares False
        return ((gap == 0) | (gap < radius)).any(dim=1)


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
            raise PolicyError(f"layer {layer.name}: {e}") from None

    return BlockContext(layer, side(layer.q_grid), side(layer.k_grid), prompt_regions(prompts, device), device)


# ---------------------------------------------------------------------------------------------------
# Mask mods. Each factory returns a function named after what it keeps.
# ---------------------------------------------------------------------------------------------------


def _distance(dr: torch.Tensor, dc: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "chebyshev":  # square neighbourhood: radius 1 = 3x3 blocks
        return torch.maximum(dr.abs(), dc.abs())
    if metric == "manhattan":  # diamond: radius 1 = the 4 edge neighbours
        return dr.abs() + dc.abs()
    return torch.hypot(dr, dc)  # euclidean: disc


def _keep_count(density: float, n: int) -> int:
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


def sink(blocks: int = 1) -> MaskMod:
    """Keep the first `blocks` key blocks for every query (attention sinks / global context)."""

    def first_key_blocks(ctx, b, h, q, k):
        return (k < blocks) & (q >= 0)

    return first_key_blocks


def _layer_seed(seed: int, layer: LayerGeometry) -> int:
    # Stable across runs and processes (unlike hash()): each layer gets its own draw.
    return (seed * 1_000_003 + zlib.crc32(layer.name.encode())) % (2**63)


def random(density: float = 0.5, seed: int = 0) -> MaskMod:
    """Keep round(density * KB) random key blocks per query block and head (at least one), seeded by
    (seed, layer name). In self-attention-shaped layers the own block is always among them, so the
    density is on target and the diagonal guard adds nothing."""

    def random_blocks(ctx, b, h, q, k):
        nh, qb, kb = h.shape[1], q.shape[2], k.shape[3]
        gen = torch.Generator().manual_seed(_layer_seed(seed, ctx.layer))
        scores = torch.rand(nh, qb, kb, generator=gen)
        if ctx.self_shaped:
            d = torch.arange(min(qb, kb))
            scores[:, d, d] = 2.0  # above any uniform draw: picked first
        top = scores.topk(_keep_count(density, kb), dim=-1).indices
        keep = torch.zeros(nh, qb, kb, dtype=torch.bool).scatter_(-1, top, True)
        return keep[None].to(ctx.device)

    return random_blocks


def nearest(density: float = 0.5) -> MaskMod:
    """Keep the round(density * KB) key blocks nearest to the query block (euclidean, in blocks; ties
    go to the lower key index): an exact density with a local shape."""

    def nearest_key_blocks(ctx, b, h, q, k):
        dr, dc = ctx.offset(q, k)
        dist = torch.hypot(dr, dc).expand(1, 1, q.shape[2], k.shape[3])
        order = torch.argsort(dist, dim=-1, stable=True)[..., : _keep_count(density, k.shape[3])]
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


def hybrid(dense_fraction: float = 0.25, sparse: Optional["PatternSpec"] = None) -> MaskMod:
    """The first max(1, round(dense_fraction * num_heads)) heads dense, the others `sparse`."""
    sparse_mod = (sparse or PatternSpec("local2d", {"radius": 1})).build()

    def first_heads_dense(ctx, b, h, q, k):
        n_dense = max(1, round(dense_fraction * h.shape[1]))
        return (h < n_dense) | sparse_mod(ctx, b, h, q, k)

    return first_heads_dense


def image_to_prompt(image_sparsity: float = 0.6, windows: bool = False) -> MaskMod:
    """The seed project's default SAM pattern, on SAM's real layers: image-to-image attention (the
    encoder's global layers, and its window layers if `windows`) keeps the (1 - image_sparsity) * KB
    nearest key blocks; everything that involves prompt/output tokens (all decoder layers) stays dense."""
    near = nearest(1.0 - image_sparsity)
    kinds = ("encoder.global", "encoder.window") if windows else ("encoder.global",)

    def sparse_image_to_image(ctx, b, h, q, k):
        if ctx.layer.kind in kinds:
            return near(ctx, b, h, q, k)
        return (q >= 0) & (k >= 0)

    return sparse_image_to_image


def region_focused(radius: float = 1, background_stride: int = 4) -> MaskMod:
    """Dense around the call's point / box prompts, sparse elsewhere.

    On the image side(s) of a layer, blocks less than `radius` block extents from a prompt are "near":
    every query keeps near key blocks, near query blocks keep every key block, and every query also
    keeps a background lattice of key blocks (block-grid row + col divisible by background_stride,
    about 1 / stride of them; 0: none). Without prompts (prompts=None, e.g. the image encoder in
    SamPredictor, which runs before any prompt) and on layers with no image side it keeps everything.
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


def and_masks(*mods: MaskMod) -> MaskMod:
    """Keep a block where every mod keeps it."""

    def and_mask(ctx, b, h, q, k):
        out = mods[0](ctx, b, h, q, k)
        for m in mods[1:]:
            out = out & m(ctx, b, h, q, k)
        return out

    and_mask.__name__ = "and_" + "_".join(m.__name__ for m in mods)
    return and_mask


def or_masks(*mods: MaskMod) -> MaskMod:
    """Keep a block where any mod keeps it."""

    def or_mask(ctx, b, h, q, k):
        out = mods[0](ctx, b, h, q, k)
        for m in mods[1:]:
            out = out | m(ctx, b, h, q, k)
        return out

    or_mask.__name__ = "or_" + "_".join(m.__name__ for m in mods)
    return or_mask


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


# ---------------------------------------------------------------------------------------------------
# Parameters: each validator returns the normalized value or raises PolicyError (path set by caller).
# ---------------------------------------------------------------------------------------------------


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Distances, strides and counts are in blocks: no grid has a million blocks per side, and a bound keeps
# absurd values (10**23) out of tensor arithmetic, where they would overflow.
MAX_BLOCKS = 1_000_000
MAX_SEED = 2**63 - 1


def _nonneg_number(v):
    if not _is_number(v):
        raise PolicyError(f"expected a number >= 0, got {_type_name(v)}")
    if v < 0:
        raise PolicyError(f"{v} is negative; expected a number >= 0 (in blocks)")
    if v > MAX_BLOCKS:
        raise PolicyError(f"{v:g} is too large; expected at most {MAX_BLOCKS} (in blocks)")
    return v


def _int_at_least(lo: int):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool):
            raise PolicyError(f"expected an integer >= {lo}, got {_type_name(v)}")
        if v < lo:
            raise PolicyError(f"{v} is below {lo}; expected an integer >= {lo}")
        if v > MAX_BLOCKS:
            raise PolicyError(f"{v} is too large; expected an integer from {lo} to {MAX_BLOCKS}")
        return v

    return check


def _optional(check):
    def opt(v):
        return None if v is None else check(v)

    return opt


def _fraction(v):
    if not _is_number(v):
        raise PolicyError(f"expected a number in (0, 1], got {_type_name(v)}")
    if not 0 < v <= 1:
        raise PolicyError(f"{v} is outside (0, 1]; expected a number greater than 0 and at most 1")
    return v


def _seed(v):
    if not isinstance(v, int) or isinstance(v, bool):
        raise PolicyError(f"expected an integer seed, got {_type_name(v)}")
    if not 0 <= v <= MAX_SEED:
        raise PolicyError(f"{v} is outside [0, 2**63 - 1]; expected a seed from 0 to {MAX_SEED}")
    return v


def _boolean(v):
    if not isinstance(v, bool):
        raise PolicyError(f"expected true or false, got {_type_name(v)}")
    return v


def _choice(*options):
    def check(v):
        if v not in options:
            raise PolicyError(f"got {_type_name(v)}; expected one of {', '.join(options)}")
        return v

    return check


def _radii(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise PolicyError(f'expected a non-empty list of radii (numbers >= 0 or "all"), got {_type_name(v)}')
    out = []
    for i, r in enumerate(v):
        if r == "all":
            out.append(r)
            continue
        if not _is_number(r) or r < 0:
            raise PolicyError(f'expected a number >= 0 or "all", got {_type_name(r)}', path=(i,))
        if r > MAX_BLOCKS:
            raise PolicyError(f'{r:g} is too large; expected at most {MAX_BLOCKS} (in blocks) or "all"', path=(i,))
        out.append(r)
    return tuple(out)


def _pattern_item(v):
    return PatternSpec.from_dict(v)


@dataclass(frozen=True)
class Param:
    """One pattern parameter: default, validator (value -> normalized value), and what it accepts."""

    default: Any
    check: Callable[[Any], Any]
    accepts: str


_METRICS = ("chebyshev", "manhattan", "euclidean")


@dataclass(frozen=True)
class PatternDef:
    """A YAML pattern: its factory (params -> mask_mod), params, and whether it needs image tokens on
    both sides of a layer (patterns measured by 2-D block distances do)."""

    name: str
    factory: Callable[..., MaskMod]
    params: Dict[str, Param]
    needs_grid: bool = False
    uses_prompts: bool = False

    def describe_params(self) -> str:
        if not self.params:
            return f"pattern {self.name} takes no parameters"
        ps = ", ".join(f"{k} ({p.accepts}, default {_yaml_scalar(p.default)})" for k, p in self.params.items())
        return f"pattern {self.name} takes: {ps}"


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}: {_yaml_scalar(x)}" for k, x in v.items()) + "}"
    return str(v)


_RADIUS = Param(1, _nonneg_number, "number >= 0, in blocks")
_METRIC = Param("chebyshev", _choice(*_METRICS), "chebyshev (square) | manhattan (diamond) | euclidean (disc)")
_DENSITY = Param(0.5, _fraction, "number in (0, 1]")

PATTERNS: Dict[str, PatternDef] = {
    p.name: p
    for p in (
        PatternDef("dense", dense, {}),
        PatternDef("local2d", local2d, {"radius": _RADIUS, "metric": _METRIC}, needs_grid=True),
        PatternDef("axial", axial, {"width": Param(0, _int_at_least(0), "integer >= 0, in blocks")}, needs_grid=True),
        PatternDef(
            "dilated",
            dilated,
            {
                "stride": Param(2, _int_at_least(1), "integer >= 1, in blocks"),
                "radius": Param(None, _optional(_int_at_least(0)), "integer >= 0 lattice steps, or null for unlimited"),
            },
            needs_grid=True,
        ),
        PatternDef("sink", sink, {"blocks": Param(1, _int_at_least(0), "integer >= 0")}),
        PatternDef("random", random, {"density": _DENSITY, "seed": Param(0, _seed, "integer from 0 to 2**63 - 1")}),
        PatternDef("nearest", nearest, {"density": _DENSITY}, needs_grid=True),
        PatternDef(
            "hierarchical",
            hierarchical,
            {"radii": Param((1, 2, 4, "all"), _radii, 'list of numbers >= 0 or "all", one per head group'), "metric": _METRIC},
            needs_grid=True,
        ),
        PatternDef(
            "hybrid",
            hybrid,
            {
                "dense_fraction": Param(0.25, _fraction, "number in (0, 1]: share of heads kept dense, first heads first"),
                "sparse": Param({"pattern": "local2d", "params": {"radius": 1}}, _pattern_item, "a pattern item {pattern: NAME, params: {...}}"),
            },
        ),
        PatternDef(
            "image_to_prompt",
            image_to_prompt,
            {
                "image_sparsity": Param(0.6, _fraction, "number in (0, 1]: share of image-to-image blocks dropped"),
                "windows": Param(False, _boolean, "true | false: also sparsify encoder.window layers"),
            },
        ),
        PatternDef(
            "region_focused",
            region_focused,
            {
                "radius": _RADIUS,
                "background_stride": Param(4, _int_at_least(0), "integer >= 0: keep ~1/stride background key blocks, 0 none"),
            },
            uses_prompts=True,
        ),
    )
}

COMBINATORS = ("any_of", "all_of")  # union (or_masks) / intersection (and_masks) of pattern items
PATTERN_KEYS = ("pattern", "params") + COMBINATORS


@dataclass(frozen=True)
class PatternSpec:
    """A validated pattern: a name from PATTERNS with its params (defaults filled in), or a combinator
    ("any_of" / "all_of") over `items`.

    params: tuple of (name, value) pairs in the pattern's declared order; lists are tuples and a nested
    pattern (hybrid's sparse) is a PatternSpec, so a spec is hashable. A Mapping is accepted too.
    """

    name: str
    params: Any = ()
    items: Tuple["PatternSpec", ...] = ()

    def __post_init__(self):
        if self.name in COMBINATORS:
            if self.params:
                raise PolicyError(f"{self.name} takes a list of pattern items, not params", path=("params",))
            if isinstance(self.items, list):
                object.__setattr__(self, "items", tuple(self.items))
            if not isinstance(self.items, tuple) or not self.items:
                raise PolicyError(f"{self.name} needs a non-empty list of pattern items", path=(self.name,))
            return
        if not isinstance(self.name, str) or self.name not in PATTERNS:
            hint = difflib.get_close_matches(str(self.name), list(PATTERNS), n=1)
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise PolicyError(
                f"unknown pattern {self.name!r}{did}; known patterns: {', '.join(PATTERNS)}", path=("pattern",)
            )
        if self.items:
            raise PolicyError(f"pattern {self.name} takes params, not items", path=("pattern",))
        object.__setattr__(self, "params", self._checked_params(self.params))

    def _checked_params(self, given) -> Tuple[Tuple[str, Any], ...]:
        pdef = PATTERNS[self.name]
        if isinstance(given, tuple):
            given = dict(given)
        if given is None:
            given = {}
        if not isinstance(given, Mapping):
            raise PolicyError(f"expected a mapping of parameters, got {_type_name(given)}; {pdef.describe_params()}", path=("params",))
        for key in given:
            if key not in pdef.params:
                hint = difflib.get_close_matches(str(key), list(pdef.params), n=1)
                did = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise PolicyError(f"unknown parameter {key!r}{did}; {pdef.describe_params()}", path=("params", key))
        out = []
        for key, p in pdef.params.items():
            value = given.get(key, p.default)
            if isinstance(value, PatternSpec):
                out.append((key, value))
                continue
            try:
                out.append((key, p.check(value)))
            except PolicyError as e:
                raise e.prefixed(("params", key)) from None
        return tuple(out)

    @property
    def kwargs(self) -> Dict[str, Any]:
        return dict(self.params)

    @classmethod
    def from_dict(cls, d: Any) -> "PatternSpec":
        """From {pattern: NAME, params: {...}} or {any_of: [items]} / {all_of: [items]}."""
        if not isinstance(d, Mapping):
            raise PolicyError(f"expected a pattern item {{pattern: NAME, params: {{...}}}}, got {_type_name(d)}")
        reject_unknown_keys(d, PATTERN_KEYS)
        given = [key for key in ("pattern",) + COMBINATORS if key in d]
        if not given:
            raise PolicyError(f"missing key 'pattern'; known patterns: {', '.join(PATTERNS)} (or any_of / all_of: [items])")
        if len(given) > 1:
            raise PolicyError(f"give one of pattern, any_of, all_of, not {' and '.join(given)}", path=(given[1],))
        key = given[0]
        if key in COMBINATORS:
            raw = d[key]
            if "params" in d:
                raise PolicyError(f"{key} takes no params; put params on its items", path=("params",))
            if not isinstance(raw, (list, tuple)) or not raw:
                raise PolicyError(f"expected a non-empty list of pattern items, got {_type_name(raw)}", path=(key,))
            items = []
            for i, item in enumerate(raw):
                try:
                    items.append(cls.from_dict(item))
                except PolicyError as e:
                    raise e.prefixed((key, i)) from None
            return cls(key, (), tuple(items))
        if not isinstance(d["pattern"], str):
            raise PolicyError(f"expected a pattern name, got {_type_name(d['pattern'])}; known patterns: {', '.join(PATTERNS)}", path=("pattern",))
        return cls(d["pattern"], d.get("params", {}))

    def to_dict(self) -> Dict[str, Any]:
        if self.name in COMBINATORS:
            return {self.name: [i.to_dict() for i in self.items]}
        out: Dict[str, Any] = {"pattern": self.name}
        if self.params:
            out["params"] = {k: _plain(v) for k, v in self.params}
        return out

    def build(self) -> MaskMod:
        """The mask_mod this spec describes."""
        if self.name == "any_of":
            return or_masks(*(i.build() for i in self.items))
        if self.name == "all_of":
            return and_masks(*(i.build() for i in self.items))
        return PATTERNS[self.name].factory(**self.kwargs)

    def walk(self):
        """This spec and every spec nested in it (combinator items, hybrid's sparse)."""
        yield self
        for item in self.items:
            yield from item.walk()
        for _, v in self.params:
            if isinstance(v, PatternSpec):
                yield from v.walk()

    @property
    def needs_grid(self) -> bool:
        return any(s.name in PATTERNS and PATTERNS[s.name].needs_grid for s in self.walk())

    @property
    def uses_prompts(self) -> bool:
        return any(s.name in PATTERNS and PATTERNS[s.name].uses_prompts for s in self.walk())

    def describe(self) -> str:
        if self.name in COMBINATORS:
            return f"{self.name}(" + ", ".join(i.describe() for i in self.items) + ")"
        return self.name


def _plain(v):
    """A param value as plain YAML data."""
    if isinstance(v, PatternSpec):
        return v.to_dict()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------------
# Densities
# ---------------------------------------------------------------------------------------------------


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


def block_density(mask: Optional[torch.Tensor]) -> float:
    """Fraction of (query block, key block) pairs kept, ignoring partial blocks."""
    return 1.0 if mask is None else float(mask.float().mean())


# ---------------------------------------------------------------------------------------------------
# SAM's attention layers
# ---------------------------------------------------------------------------------------------------

# image encoder per model type: depth, heads, global-attention block indices (segment_anything.build_sam)
SAM_ENCODERS = {
    "vit_b": {"depth": 12, "num_heads": 12, "global_blocks": (2, 5, 8, 11)},
    "vit_l": {"depth": 24, "num_heads": 16, "global_blocks": (5, 11, 17, 23)},
    "vit_h": {"depth": 32, "num_heads": 16, "global_blocks": (7, 15, 23, 31)},
    # MobileSAM: TinyViT is not SAM's ViT and is never patched; only SAM's own decoder has layers here.
    "mobile_sam": {"depth": 0, "num_heads": 0, "global_blocks": ()},
}
SAM_WINDOW = 14  # encoder window size (tokens per side)
SAM_DECODER_HEADS = 8
SAM_DECODER_DEPTH = 2  # TwoWayTransformer blocks


def sam_layer_geometries(
    model_type: str,
    block_size: int = 128,
    key_tile_fn: Optional[Callable[[LayerGeometry], Optional[Tuple[int, int]]]] = None,
    *,
    num_tokens: int = 7,
    image_size: int = 1024,
) -> list:
    """LayerGeometry of every attention layer of an unpatched SAM, in forward order.

    model_type: vit_b | vit_l | vit_h | mobile_sam (decoder layers only: its encoder is not patched). key_tile_fn(layer) -> (th, tw) | None sets each layer's token
    order (e.g. ``policy.key_tile``); None keeps raster everywhere. num_tokens: prompt + output tokens
    in the mask decoder (5 output tokens + 2 for one point and its padding, or a box's two corners).
    Names follow segment-anything's modules (image_encoder.blocks.{i}.attn, mask_decoder.transformer.
    layers.{j}.self_attn / cross_attn_token_to_image / cross_attn_image_to_token,
    mask_decoder.transformer.final_attn_token_to_image).
    """
    if model_type not in SAM_ENCODERS:
        raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(SAM_ENCODERS)}")
    enc = SAM_ENCODERS[model_type]
    side = image_size // 16
    grid, n_img = (side, side), side * side
    win = (SAM_WINDOW, SAM_WINDOW)
    layers, counts = [], {}

    def add(name, kind, heads, sq, sk, qg, kg):
        layer = LayerGeometry(name, kind, heads, sq, sk, qg, kg, block_size, None, counts.get(kind, 0))
        counts[kind] = counts.get(kind, 0) + 1
        if key_tile_fn is not None:
            layer = replace(layer, key_tile=key_tile_fn(layer))
        layers.append(layer)

    for i in range(enc["depth"]):
        if i in enc["global_blocks"]:
            add(f"image_encoder.blocks.{i}.attn", "encoder.global", enc["num_heads"], n_img, n_img, grid, grid)
        else:
            add(f"image_encoder.blocks.{i}.attn", "encoder.window", enc["num_heads"], 196, 196, win, win)
    pre, h = "mask_decoder.transformer", SAM_DECODER_HEADS
    for j in range(SAM_DECODER_DEPTH):
        add(f"{pre}.layers.{j}.self_attn", "decoder.self", h, num_tokens, num_tokens, None, None)
        add(f"{pre}.layers.{j}.cross_attn_token_to_image", "decoder.token_to_image", h, num_tokens, n_img, None, grid)
        add(f"{pre}.layers.{j}.cross_attn_image_to_token", "decoder.image_to_token", h, n_img, num_tokens, grid, None)
    add(f"{pre}.final_attn_token_to_image", "decoder.final_token_to_image", h, num_tokens, n_img, None, grid)
    return layers
