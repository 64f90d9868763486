"""kernels.compile_ahead on the GPU: inside the block, calls compile their kernels (on a thread pool) instead of
launching them, and after it the same calls compile nothing and are exact (the float64 oracle, per row, into
NaN-poisoned outputs); a patched image encoder's first call (SAM 2.1's, SAM's) compiles every kernel in its pass.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_gpu_compile_ahead.py
"""

import pytest
import torch

from gpu_helpers import FLOOR, GPU_MARKS, ROW_FLOOR, check_rows, rnd, seeded
from oracle import check_window
from sam_sparse.kernels import block_sparse_attn, window_attn

pytestmark = GPU_MARKS


def _fresh_kernels(monkeypatch):
    """No plan, no tuned class, no compiled kernel of this process (Triton's disk cache may still serve a compile),
    nothing read from or written to the tuning file; returns the list each _attn_fwd compile appends to: whether
    it ran inside compile_ahead."""
    from sam_sparse.kernels import interface, triton_attn

    pytest.importorskip("triton.runtime._async_compile", reason="this Triton has no async compiles: no compile_ahead")
    monkeypatch.setattr(interface, "_PLANS", {})
    monkeypatch.setattr(triton_attn, "_TUNED", {})
    monkeypatch.setenv("SAM_SPARSE_TUNE_CACHE", "0")
    for cache in triton_attn._attn_fwd.device_caches.values():
        cache[0].clear()
    compiles = []
    real = triton_attn._attn_fwd._do_compile

    def counted(*args, **kwargs):
        compiles.append(getattr(interface._AHEAD, "device", None) is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_attn._attn_fwd, "_do_compile", counted)
    return compiles


def test_compile_ahead_compiles_before_the_calls(monkeypatch):
    """kernels.compile_ahead: inside it, calls that need a new plan (a global block, Hiera's pooled windows into a
    padded grid) compile their kernels and return without a plan; after it, the same calls compile nothing and
    match the float64 oracle per row, into NaN-poisoned outputs; a call whose plan exists runs inside the block."""
    from sam_sparse.kernels import compile_ahead, interface

    compiles = _fresh_kernels(monkeypatch)
    seed, g = seeded()
    q, k, v = rnd(g, 2, 4096, 3, 8, 56, dtype=torch.bfloat16).unbind(2)
    wq, wk, wv = rnd(g, 2, 64, 64, 3, 16, 56, dtype=torch.bfloat16).unbind(3)
    pq = wq.unflatten(1, (32, 2)).unflatten(3, (32, 2)).amax(dim=(2, 4))  # 2 x 2 max-pooled queries, as Hiera's
    kp, vp = rnd(g, 16, 56, dtype=torch.bfloat16), rnd(g, 16, 56, dtype=torch.bfloat16)
    with compile_ahead("cuda") as compiling:
        assert compiling
        assert block_sparse_attn(q, k, v).shape == q.shape
        assert window_attn(pq, wk, wv, (14, 14), q_window_size=(7, 7), k_pad=kp, v_pad=vp).shape == pq.shape
    assert compiles and all(compiles), compiles
    assert not interface._PLANS, "compile_ahead makes no plan"
    n = len(compiles)
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=q.dtype)
    out.copy_(block_sparse_attn(q, k, v))
    wout = torch.full(pq.shape, float("nan"), device="cuda", dtype=q.dtype)
    wout.copy_(window_attn(pq, wk, wv, (14, 14), q_window_size=(7, 7), k_pad=kp, v_pad=vp))
    torch.cuda.synchronize()
    assert len(compiles) == n, f"the calls compiled {len(compiles) - n} kernels after compile_ahead"
    check_rows(out, q, k, v, None, 128, seed)
    check_window(wout, pq, wk, wv, (14, 14), kp, vp, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR,
                 q_window=(7, 7))
    with compile_ahead("cuda"):
        again = block_sparse_attn(q, k, v)  # the plan exists: a real launch
    torch.cuda.synchronize()
    assert torch.equal(again, out) and len(compiles) == n


def test_patched_encoder_compiles_ahead_on_its_first_call(monkeypatch):
    """A patched SAM 2.1 image encoder's first call of an input signature (sam2_encoder.py) compiles every
    attention kernel inside compile_ahead, before its forward launches any: no compile happens outside it; its
    output is the unpatched encoder's; a second call makes no pass; the handle records the signature."""
    from sam2_helpers import small_sam2

    from sam_sparse import patch_sam

    model = small_sam2("sam2.1_hiera_t", image_size=1024).cuda().to(torch.bfloat16)
    x = torch.randn(2, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = model.image_encoder(x)["vision_features"]
    handle = patch_sam(model, "dense")
    compiles = _fresh_kernels(monkeypatch)
    try:
        with torch.inference_mode():
            out = model.image_encoder(x)["vision_features"]
            torch.cuda.synchronize()
            assert compiles and all(compiles), f"{compiles.count(False)} of {len(compiles)} compiles outside the pass"
            assert list(handle.memory.compiled_ahead.values()) == [True]
            n = len(compiles)
            again = model.image_encoder(x)["vision_features"]
        assert torch.equal(again, out) and len(compiles) == n
        cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0).item()
        assert cos >= 0.999, cos
    finally:
        handle.restore()


def test_patched_sam_encoder_compiles_ahead_on_its_first_call(monkeypatch):
    """The same for SAM's ImageEncoderViT (vit_b, rel-pos tables randomized, bf16, 1024 px): its windowed blocks
    (rel-pos terms, windows overhanging the 64 x 64 grid) and global blocks compile every kernel in the pass."""
    from segment_anything import sam_model_registry

    from sam_sparse import patch_sam

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    with torch.no_grad():  # SAM zero-initializes the rel-pos tables: randomize them so they matter
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    enc = sam.image_encoder.eval().cuda().to(torch.bfloat16)
    x = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = enc(x)
    handle = patch_sam(enc, "dense")
    compiles = _fresh_kernels(monkeypatch)
    try:
        with torch.inference_mode():
            out = enc(x)
            torch.cuda.synchronize()
            assert compiles and all(compiles), f"{compiles.count(False)} of {len(compiles)} compiles outside the pass"
            assert list(handle.memory.compiled_ahead.values()) == [True]
        cos = torch.nn.functional.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0).item()
        assert cos >= 0.999, cos
    finally:
        handle.restore()
