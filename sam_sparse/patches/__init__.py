"""Patching SAM models: route their attention through block_sparse_attn, and check parity."""

from .attention import SparseDecoderAttention, SparseEncoderAttention, SparseWindowBlock
from .parity import DENSE_FP32, DENSE_HALF, SPARSE, LayerParity, ParityReport, ParityThresholds, preset_for, verify_parity
from .families import model_family
from .patcher import (LayerReport, PatchHandle, PolicyWarning, dense_attention, observing, patch_epoch, patch_sam,
                      record_prompts, unpatch_sam)
from .video_parity import FrameParity, VideoParityReport, video_parity

__all__ = [
    "patch_sam",
    "unpatch_sam",
    "model_family",
    "PatchHandle",
    "patch_epoch",
    "observing",
    "dense_attention",
    "record_prompts",
    "PolicyWarning",
    "LayerReport",
    "verify_parity",
    "video_parity",
    "VideoParityReport",
    "FrameParity",
    "ParityReport",
    "ParityThresholds",
    "LayerParity",
    "DENSE_FP32",
    "DENSE_HALF",
    "SPARSE",
    "preset_for",
    "SparseEncoderAttention",
    "SparseDecoderAttention",
    "SparseWindowBlock",
]
