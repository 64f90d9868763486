"""Patched models end to end: SamPredictor, SamAutomaticMaskGenerator, torch.compile, and one 1024-px
vit_b-shaped run (CPU)."""

import numpy as np
import pytest
import torch
from patch_helpers import make_image, randomize_, small_encoder, small_policy, small_sam
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry

import sam_sparse.patches.attention as attention_mod
from sam_sparse import patch_sam
from sam_sparse.bench import reset_dynamo


def test_predictor_end_to_end():
    sam = small_sam()
    image = make_image()
    p = SamPredictor(sam)
    p.set_image(image)
    ref = p.predict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]),
                    box=np.array([20, 30, 150, 220.0]), multimask_output=False)
    handle = patch_sam(sam, small_policy(params={"radius": 1}))
    p.set_image(image)  # the same predictor object, unchanged
    masks, scores, low_res = p.predict(point_coords=np.array([[100.0, 120.0]]), point_labels=np.array([1]),
                                       box=np.array([20, 30, 150, 220.0]), multimask_output=False)
    handle.restore()
    assert masks.shape == ref[0].shape == (1, 256, 192) and masks.dtype == bool
    assert low_res.shape == (1, 64, 64) and np.isfinite(scores).all()  # 4x the 16x16 grid


def test_automatic_mask_generator_runs():
    sam = small_sam()
    image = make_image()
    kw = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    ref = SamAutomaticMaskGenerator(sam, **kw).generate(image)
    handle = patch_sam(sam, "dense")
    got = SamAutomaticMaskGenerator(sam, **kw).generate(image)
    handle.restore()
    assert len(got) == len(ref) > 0
    for a, b in zip(got, ref):
        assert set(a) == set(b) and a["segmentation"].shape == image.shape[:2]
        inter = (a["segmentation"] & b["segmentation"]).sum()
        union = (a["segmentation"] | b["segmentation"]).sum()
        assert union == 0 or inter / union > 0.99


def test_torch_compile_fullgraph(monkeypatch):
    """No graph break in a patched encoder (tiles order, sparse mask, rel-pos); the compiled result matches. The
    encoder's first-call pass (first_call.py) is opened as on CUDA: a traced call makes none.

    aot_eager traces through the kernel's fake implementation exactly as inductor does, without a C++
    build (inductor on CPU takes about a minute here; it was checked by hand).
    """
    from sam_sparse.patches import first_call

    monkeypatch.setattr(first_call, "_on_device", lambda sample: True)
    enc = small_encoder(depth=2, global_attn_indexes=(1,))
    x = torch.randn(1, 3, 256, 256)
    handle = patch_sam(enc, small_policy(params={"radius": 1}))
    reset_dynamo()
    with torch.no_grad():
        eager = enc(x)
        handle.memory.compiled_ahead.clear()  # each trace below meets a first call
        explained = torch._dynamo.explain(enc)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        reset_dynamo()
        handle.memory.compiled_ahead.clear()
        compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    assert not handle.memory.compiled_ahead, "a traced call makes no pass"
    reset_dynamo()
    handle.restore()
    assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_vit_b_1024(monkeypatch):
    """The full vit_b of sam_model_registry at 1024 px (random weights, rel-pos randomized): eight
    windowed blocks (25 windows of 14x14 over the 64x64 grid, padding keys = the qkv bias), four global blocks on 64x64 tokens, its neck,
    and SAM's decoder on the 64x64 embedding. About a minute on a CPU."""
    sam = sam_model_registry["vit_b"]()
    randomize_(sam)
    calls = []
    real, real_window = attention_mod.block_sparse_attn, attention_mod.window_attn

    def spy(q, k, v, block_mask=None, **kw):
        calls.append(tuple(q.shape))
        return real(q, k, v, block_mask, **kw)

    def spy_window(q, k, v, window_size, block_mask=None, **kw):
        calls.append(tuple(q.shape))
        return real_window(q, k, v, window_size, block_mask, **kw)

    image = make_image(size=1024)
    point = dict(point_coords=np.array([[400.0, 500.0]]), point_labels=np.array([1]), return_logits=True)
    p = SamPredictor(sam)
    with torch.no_grad():
        p.set_image(image)
        ref_emb = p.features
        ref = p.predict(**point)
        monkeypatch.setattr(attention_mod, "block_sparse_attn", spy)
        monkeypatch.setattr(attention_mod, "window_attn", spy_window)
        handle = patch_sam(sam, "dense")
        p.set_image(image)
        out = p.predict(**point)
    handle.restore()
    window, global_ = (1, 64, 64, 12, 64), (1, 4096, 12, 64)  # windows read in place from the 64x64 grid
    assert calls[:12] == [global_ if i in (2, 5, 8, 11) else window for i in range(12)]
    assert len(calls) == 12 + 7
    rel = float((p.features - ref_emb).norm() / ref_emb.norm())
    assert rel < 1e-5
    # Identical binarized masks, except where the unpatched logit itself is within rounding of 0.
    flips = (out[0] > 0) != (ref[0] > 0)
    assert not (flips & (np.abs(ref[0]) > 1e-4)).any(), int(flips.sum())
    assert np.abs(out[2] - ref[2]).max() < 1e-4


def test_bench_script_smoke(tmp_path):
    """scripts/bench_e2e.py (run on a GPU by hand) still runs: tiny model, eager, CPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--no-compile", "--no-predictor", "--policies", "dense,local2d-30", "--device", "cpu",
                "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["original", "sdpa+bias", "dense", "local2d-30"]
    assert all("error" not in r and r["cosine"] > 0.99999 for r in rows)
