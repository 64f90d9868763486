"""Attention kernels. Nothing here knows about SAM: shapes, masks and a decomposed 2-D bias only."""

from .block_mass import block_attention_mass
from .interface import HEAD_DIMS, HEAD_DIMS_ACCEPTED, block_lists, block_sparse_attn, block_sparse_attn_varlen, window_attn
from .layout import BlockLayout, check_block_size
from .reference import attention_reference

__all__ = [
    "block_sparse_attn",
    "block_sparse_attn_varlen",
    "window_attn",
    "BlockLayout",
    "block_lists",
    "check_block_size",
    "attention_reference",
    "HEAD_DIMS",
    "HEAD_DIMS_ACCEPTED",
    "block_attention_mass",
]
