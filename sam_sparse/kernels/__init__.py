"""Attention kernels. Nothing here knows about SAM: shapes, masks and a decomposed 2-D bias only."""

from .interface import block_lists, block_sparse_attn, block_sparse_attn_varlen
from .reference import attention_reference

__all__ = ["block_sparse_attn", "block_sparse_attn_varlen", "block_lists", "attention_reference"]
