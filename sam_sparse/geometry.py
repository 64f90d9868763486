"""What a block mask is built for: one attention layer (LayerGeometry) and the call's prompts.

The contract between the patcher, which describes each attention module it finds, and the mask
patterns and policies, which turn that description into a block mask. The layer kinds name attention
roles (image self-attention over the whole grid or one window, from a pooled window to the full one,
token self-attention, the two cross directions); which module of a model family has which role is that
family's table (sam_layers.py for SAM, sam2_layers.py for SAM 2). No torch ops, no segment-anything,
no Triton.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# Layer kinds, in the order they appear in a forward pass.
LAYER_KINDS = (
    "encoder.global",  # image encoder block with window_size == 0: all 4096 tokens attend to all
    "encoder.window",  # image encoder block inside windows (SAM: 14x14; Hiera: 8, 4, 14, 7 by stage)
    "encoder.pooled",  # Hiera's first block of a stage: queries max-pooled by 2, each pooled window
    #                    (4x4 of an 8x8 window, ...) attends to its full window of keys
    "decoder.self",  # mask decoder: prompt/output tokens attend to themselves
    "decoder.token_to_image",  # tokens (queries) attend to image tokens (keys)
    "decoder.image_to_token",  # image tokens (queries) attend to tokens (keys)
    "decoder.final_token_to_image",  # the last token-to-image attention after the two-way blocks
    "memory.self",  # video memory attention (SAM 2): the frame's tokens attend to themselves
    "memory.cross",  # video memory attention: the frame's tokens attend to the memory (memory frames, then
    #                  object-pointer tokens; the call's MemoryLayout says which frames are conditioning frames)
)

GRID_KINDS = ("encoder.global", "encoder.window", "encoder.pooled", "memory.self")  # image tokens on both sides
SELF_KINDS = ("encoder.global", "encoder.window", "decoder.self", "memory.self")  # queries and keys are the same tokens
MEMORY_KINDS = ("memory.self", "memory.cross")

Grid = Tuple[int, int]


@dataclass(frozen=True)
class MemoryLayout:
    """The keys of one memory cross-attention call (SAM 2 video), in the order the model concatenates them.

    frames: one bool per memory frame, in key order: True for a conditioning frame (one the user prompted;
        SAM 2 puts them first), False for a tracked (non-conditioning) frame.
    grid: (rows, cols) of each memory frame's tokens, the frame's embedding grid (64 x 64 at 1024 px);
        the queries are the current frame's tokens on the same grid.
    pointer_tokens: object-pointer tokens after the frames (4 per pointer in SAM 2.1, up to 64), no grid.
    Keys: len(frames) * rows * cols frame tokens (frame f holds keys f*T .. (f+1)*T - 1 in raster order),
    then the pointer tokens.
    """

    frames: Tuple[bool, ...]
    grid: Grid
    pointer_tokens: int = 0

    def __post_init__(self):
        object.__setattr__(self, "frames", tuple(bool(f) for f in self.frames))
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise ValueError(f"MemoryLayout.grid={self.grid}: expected (rows, cols) >= 1")
        if isinstance(self.pointer_tokens, bool) or not isinstance(self.pointer_tokens, int) or self.pointer_tokens < 0:
            raise ValueError(f"MemoryLayout.pointer_tokens={self.pointer_tokens!r}: expected an int >= 0")

    @property
    def frame_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seqlen(self) -> int:
        """Keys in all: frames * frame_tokens + pointer_tokens."""
        return len(self.frames) * self.frame_tokens + self.pointer_tokens

    @property
    def cond_frames(self) -> int:
        return sum(self.frames)


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
        tiles, tiles in raster order (see masks.tile_permutation). The name is the kernel's, but the
        order applies to queries too: both sides of an image layer use it.
    memory: for memory.cross, the call's MemoryLayout (seqlen_k == memory.seqlen; k_grid is None since
        the keys span several frames); None elsewhere, and for a memory.cross template not yet called.
    stage: the encoder stage (1-4) of a multi-scale encoder's layer (Hiera), None elsewhere (SAM's ViT
        has one scale; decoders). For encoder.pooled, q_grid is k_grid pooled by 2: a query token covers
        2 x 2 key tokens.
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
    stage: Optional[int] = None
    memory: Optional[MemoryLayout] = None

    def __post_init__(self):
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"LayerGeometry.kind={self.kind!r}: expected one of {', '.join(LAYER_KINDS)}")
        if self.memory is not None:
            if self.kind != "memory.cross":
                raise ValueError(f"LayerGeometry.memory is for memory.cross layers, not {self.kind}")
            if self.memory.seqlen != self.seqlen_k:
                raise ValueError(f"LayerGeometry.memory holds {self.memory.seqlen} keys but seqlen_k={self.seqlen_k}")
        for side, grid, n in (("q", self.q_grid, self.seqlen_q), ("k", self.k_grid, self.seqlen_k)):
            if grid is not None and grid[0] * grid[1] != n:
                raise ValueError(f"LayerGeometry.{side}_grid={grid} does not hold seqlen_{side}={n} tokens")

    @property
    def same_tokens(self) -> bool:
        """Queries and keys are the same tokens in the same order, so block i of each is the same block."""
        return self.kind in SELF_KINDS and self.seqlen_q == self.seqlen_k

    @property
    def q_blocks(self) -> int:
        return -(-self.seqlen_q // self.block_size)

    @property
    def k_blocks(self) -> int:
        return -(-self.seqlen_k // self.block_size)


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
