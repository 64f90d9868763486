"""SAM2VideoPredictorVOS (vos_optimized=True) under patch_sam on CUDA: the patched attentions traced into
SAM 2's fullgraph torch.compile graphs and compiled by inductor (the custom ops, the in-place rotary op
on a view of the keys), against the same weights unpatched. The CPU tests (tests/test_sam2_video.py)
trace with dynamo's eager / aot_eager backends only; this is the one that generates code.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_gpu_vos.py
"""

import numpy as np
import pytest
import torch
from gpu_helpers import GPU_MARKS

pytestmark = GPU_MARKS


def propagate(predictor, frames):
    """Every propagated frame's mask logits (objects, 1, H, W), float32 on the CPU; two objects, fp32."""
    with torch.inference_mode():
        state = predictor.init_state(str(frames))
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=1, points=np.array([[40.0, 45.0]], np.float32),
                                        labels=np.array([1], np.int32))
        predictor.add_new_points_or_box(state, frame_idx=0, obj_id=2, box=np.array([10.0, 50.0, 70.0, 88.0]))
        return [m.float().cpu() for _, _, m in predictor.propagate_in_video(state)]


def test_vos_optimized_dense_matches_unpatched_vos(tmp_path):
    """tests/sam2_helpers' small VOS predictor (hiera_t, 256 px) on CUDA, patched and compiled by inductor
    without max-autotune (its GEMM search would take minutes and test nothing of ours), against the same
    weights' VOS predictor unpatched and traced by dynamo alone (its eager backend): one inductor build,
    not two. Both get rotary tables fitted to the 256 px grid (sam2_helpers.fit_rope_tables_)."""
    pytest.importorskip("sam2", reason="sam2 is an optional dependency")
    from sam2_helpers import fit_rope_tables_, small_video_predictor, write_frames

    from sam_sparse import patch_sam

    frames = write_frames(tmp_path / "frames", count=5)
    def small_vos(backend):
        return fit_rope_tables_(small_video_predictor(image_size=256, vos_backend=backend).cuda())

    ref = propagate(small_vos("eager"), frames)
    vos = small_vos("inductor")
    handle = patch_sam(vos, "dense")
    try:
        out = propagate(vos, frames)
    finally:
        handle.restore()
    assert len(out) == len(ref) == 5
    for i, (a, b) in enumerate(zip(ref, out)):
        inter, union = ((a > 0) & (b > 0)).sum().item(), ((a > 0) | (b > 0)).sum().item()
        iou = 1.0 if union == 0 else inter / union
        err = (a - b).abs().max().item()
        assert iou >= 0.99 and err <= 0.05, f"frame {i}: mask IoU {iou:.4f}, max logit error {err:.3g}"
