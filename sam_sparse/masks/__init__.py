"""Block-mask patterns: small named mask factories over a layer's block grid, composable with
and_masks / or_masks. They know the LayerGeometry contract, not SAM: which layer is which is the
policy's and the patcher's business. See grid.py for the mask_mod signature."""

from .combine import and_masks, hybrid, only_on_kinds, or_masks
from .density import block_tokens, head_densities, mask_density, pair_weights
from .grid import (
    BlockContext,
    BlockSide,
    MaskError,
    MaskMod,
    block_context,
    block_side,
    default_key_tile,
    evaluate,
    prompt_regions,
    tile_permutation,
    token_coords,
)
from .local import axial, dense, diagonal, dilated, hierarchical, local2d, nearest, relative_blocks
from .memory import memory_local
from .prompt import region_focused
from .sampled import random_blocks, sink
