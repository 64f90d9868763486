"""sam-sparse: block-sparse Triton attention for Segment Anything, with verified parity."""

__version__ = "0.1.0"

from .geometry import LAYER_KINDS, LayerGeometry
from .masks import tile_permutation
from .kernels import BlockLayout, block_sparse_attn, block_sparse_attn_varlen
from .policy import Policy, PolicyError, list_policies, load_policy
from .patches import ParityReport, ParityThresholds, PatchHandle, PolicyWarning, patch_sam, unpatch_sam, verify_parity
from .models import CheckpointError, build_sam, fetch_mobile_sam, load_checkpoint, load_sparse_sam
from .predictor import set_image_on_device
from .calibration import CalibrationReport, calibrate

__all__ = [
    "__version__",
    "block_sparse_attn",
    "block_sparse_attn_varlen",
    "BlockLayout",
    "LayerGeometry",
    "LAYER_KINDS",
    "tile_permutation",
    "load_policy",
    "Policy",
    "PolicyError",
    "list_policies",
    "patch_sam",
    "unpatch_sam",
    "PatchHandle",
    "PolicyWarning",
    "verify_parity",
    "ParityReport",
    "ParityThresholds",
    "build_sam",
    "fetch_mobile_sam",
    "load_checkpoint",
    "load_sparse_sam",
    "CheckpointError",
    "set_image_on_device",
    "calibrate",
    "CalibrationReport",
]
