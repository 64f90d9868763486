"""Attention kernels, a fused upscaling head, few-key attention with its LayerNorm fused, bilinear resizing
fused with a threshold, and rotary position encoding in place. Nothing here knows about SAM: shapes, masks,
a decomposed 2-D bias, convolution weights and position tables only."""

from .block_mass import block_attention_mass
from .few_keys import few_key_attention_norm
from .interface import (HEAD_DIMS, HEAD_DIMS_ACCEPTED, block_lists, block_sparse_attn, block_sparse_attn_varlen,
                        compile_ahead, window_attn)
from .layout import BlockLayout, check_block_size
from .reference import attention_reference
from .resize import resized_masks, resized_stats
from .rotary import rotary_embedding_
from .upscale import upscale_project

__all__ = [
    "block_sparse_attn",
    "block_sparse_attn_varlen",
    "window_attn",
    "compile_ahead",
    "BlockLayout",
    "block_lists",
    "check_block_size",
    "attention_reference",
    "HEAD_DIMS",
    "HEAD_DIMS_ACCEPTED",
    "block_attention_mass",
    "upscale_project",
    "few_key_attention_norm",
    "resized_stats",
    "resized_masks",
    "rotary_embedding_",
]
