"""sam-sparse: block-sparse Triton attention for Segment Anything, with verified parity."""

__version__ = "0.1.0"

from .geometry import LAYER_KINDS, LayerGeometry, tile_permutation
from .kernels import block_sparse_attn, block_sparse_attn_varlen

__all__ = [
    "__version__",
    "block_sparse_attn",
    "block_sparse_attn_varlen",
    "LayerGeometry",
    "LAYER_KINDS",
    "tile_permutation",
]
