"""sam-sparse: block-sparse Triton attention for Segment Anything, with verified parity."""

import importlib

__version__ = "0.1.0"

# Each public name and the module that defines it, imported on first use (PEP 562): `import
# sam_sparse.cli` then costs no torch import, so the command line catches Ctrl-C from its first line.
_EXPORTS = {
    "LAYER_KINDS": "geometry",
    "LayerGeometry": "geometry",
    "tile_permutation": "masks",
    "BlockLayout": "kernels",
    "block_sparse_attn": "kernels",
    "block_sparse_attn_varlen": "kernels",
    "Policy": "policy",
    "PolicyError": "policy",
    "list_policies": "policy",
    "load_policy": "policy",
    "ParityReport": "patches",
    "ParityThresholds": "patches",
    "PatchHandle": "patches",
    "PolicyWarning": "patches",
    "patch_sam": "patches",
    "unpatch_sam": "patches",
    "verify_parity": "patches",
    "video_parity": "patches",
    "VideoParityReport": "patches",
    "CheckpointError": "models",
    "build_sam": "models",
    "fetch_mobile_sam": "models",
    "load_checkpoint": "models",
    "load_sparse_sam": "models",
    "convert_checkpoint": "convert",
    "set_image_on_device": "predictor",
    "CalibrationReport": "calibration",
    "calibrate": "calibration",
    "calibrate_memory": "calibration",
    "MemoryCalibrationReport": "calibration",
    "build_video_predictor": "models",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sam_sparse' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
