"""The GPU test suite: the Triton kernel compiled for the card, and SamPredictor on CUDA, against the float64
oracle. Run it on a GPU machine whenever kernel or runtime code changes:

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu

CI's CPU run collects and skips it (no CUDA). Every case draws fresh random inputs (the seed is in the
failure message), poisons the output before the kernel writes it, and checks per row and globally.
"""

import itertools

import numpy as np
import pytest
import torch

from gpu_helpers import DTYPES, FLOOR, GPU_MARKS, ROW_FLOOR, float32_settings, rnd, seeded
from oracle import oracle_attention, rel_error, same_dtype_torch
from sam_sparse import block_sparse_attn, block_sparse_attn_varlen, patch_sam
from sam_sparse.kernels import BlockLayout

pytestmark = GPU_MARKS

def check(out, q, k, v, mask, rel_h=None, rel_w=None, tile=None, bs=128, seed=None):
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), f"seed {seed}: NaN/inf in the output (or a row left unwritten)"
    ref = oracle_attention(q, k, v, mask, rel_h, rel_w, tile, block_size=bs)
    base = same_dtype_torch(q, k, v, mask, rel_h, rel_w, tile, block_size=bs)
    err, err_base = rel_error(out, ref), rel_error(base, ref)
    assert err <= 2 * err_base + FLOOR[q.dtype], f"seed {seed}: error {err:.3g} vs PyTorch {q.dtype} {err_base:.3g}"
    row_err = (out.double() - ref).abs().amax(dim=-1)
    row_base = (base.double() - ref).abs().amax(dim=-1)
    bad = row_err > 2 * row_base + ROW_FLOOR[q.dtype]
    assert not bad.any(), f"seed {seed}: {int(bad.sum())} rows off, worst {row_err.max():.3g}"


def run(q, k, v, mask, rel_h=None, rel_w=None, tile=None, bs=128, config=None):
    """One launch into a NaN-poisoned output: a fixed config, or the tuned plan when config is None."""
    from sam_sparse.kernels import triton_attn

    out = torch.full(q.shape, float("nan"), device="cuda", dtype=q.dtype)
    layout = BlockLayout.from_mask(mask, bs) if mask is not None else None
    lists = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    triton_attn.attention_triton(q, k, v, *lists, rel_h, rel_w, tile, q.shape[-1] ** -0.5, bs, out=out, config=config)
    return out


def inputs(g, dtype, B, Nq, Nk, H, Hk, D, rel=None, noncontig=False):
    if noncontig:  # strided views of one fused projection, as SAM's qkv gives them
        q, k, v = rnd(g, B, Nq, 3, H, D, dtype=dtype).unbind(2)
        k, v = k[:, :, :Hk], v[:, :, :Hk]
    else:
        q, k, v = rnd(g, B, Nq, H, D, dtype=dtype), rnd(g, B, Nk, Hk, D, dtype=dtype), rnd(g, B, Nk, Hk, D, dtype=dtype)
    rel_h = rel_w = None
    if rel is not None:  # (B, H, k, N) storage, as the patcher hands them over
        rel_h = (rnd(g, B, H, rel[0], Nq, dtype=dtype) * 2).transpose(-1, -2)
        rel_w = (rnd(g, B, H, rel[1], Nq, dtype=dtype) * 2).transpose(-1, -2)
    return q, k, v, rel_h, rel_w


def rand_mask(g, B, H, Nq, Nk, bs, density):
    m = torch.rand(B, H, -(-Nq // bs), -(-Nk // bs), device="cuda", generator=g) < density
    if Nk % bs:
        m[..., -1] = True  # the partial last key block in play
    m[0, 0, 0] = False  # one empty query block: zeros, never NaN
    return m


CFG = {
    "64x64": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "128x128": dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    "128x32": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    "wdot64": dict(BLOCK_M=64, BLOCK_N=64, W_DOT=1, num_warps=4, num_stages=3),
    "wdot128": dict(BLOCK_M=128, BLOCK_N=64, W_DOT=1, num_warps=8, num_stages=3),
}


@pytest.mark.parametrize("dtype", DTYPES)
# 24, 104 and 200 run as one chunk wider than the head dim (32, 128, 256 columns), through TMA in 16 bits: boxes past
# the head dim, where the descriptor gives zeros (56, hiera_b+'s, in tests/gpu/test_gpu_packed.py).
@pytest.mark.parametrize("D", [16, 24, 32, 48, 64, 80, 96, 104, 128, 160, 200, 256])
def test_head_dims_gqa_partial_blocks(dtype, D):
    seed, g = seeded()
    q, k, v, _, _ = inputs(g, dtype, 2, 300, 333, 4, 2, D)
    mask = rand_mask(g, 2, 4, 300, 333, 128, 0.6)
    check(run(q, k, v, mask), q, k, v, mask, seed=seed)


BIAS = [  # (rel grid, key tile, Nq=Nk, B, block size, density)
    ((64, 64), None, 4096, 1, 128, 0.3),   # SAM's global layer, raster: rect path, rel_w hoisted
    ((64, 64), (8, 16), 4096, 1, 128, 0.3),  # tiles policy order
    ((14, 14), None, 196, 3, 128, None),   # SAM's window: one-hot path
    ((3, 100), None, 300, 1, 64, 0.7),     # odd grid: gather path
]


def _fits(dtype, cfg, case):
    """Configs the tuner could pick: tiles inside one mask block, fp32 tiles no larger than 64 x 64."""
    c, bs = CFG[cfg], BIAS[case][4]
    return not (bs % c["BLOCK_M"] or bs % c["BLOCK_N"] or (dtype == torch.float32 and c["BLOCK_M"] * c["BLOCK_N"] > 64 * 64))


@pytest.mark.parametrize("dtype,cfg,case", [
    (d, c, i) for d, c, i in itertools.product(DTYPES, CFG, range(len(BIAS))) if _fits(d, c, i)])
def test_rel_pos_paths(dtype, cfg, case):
    rel, tile, n, B, bs, density = BIAS[case]
    config = CFG[cfg]
    seed, g = seeded()
    q, k, v, rh, rw = inputs(g, dtype, B, n, n, 2, 2, 80 if case % 2 else 64, rel=rel, noncontig=True)
    mask = rand_mask(g, B, 2, n, n, bs, density) if density else None
    check(run(q, k, v, mask, rh, rw, tile, bs, config), q, k, v, mask, rh, rw, tile, bs, seed=seed)


@pytest.mark.parametrize("D", [64, 80])
@pytest.mark.parametrize("case", ["dense", "mask", "bias"])
def test_tma_path(D, case):
    """K / V through TMA descriptors (Hopper), in the two configs the tuner may pick: partial last key
    tile (300 keys: the descriptor's zero fill), strided views of one qkv tensor, a mask, the one-hot bias."""
    from sam_sparse.kernels import triton_attn

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    seed, g = seeded()
    q, k, v, rh, rw = inputs(g, torch.bfloat16, 2, 300, 300, 4, 4, D, rel=(20, 15) if case == "bias" else None,
                             noncontig=True)
    assert triton_attn.tma_eligible(k, v, 64), "these views should be readable through TMA descriptors"
    for bm, warps, bs in ((128, 8, 128), (64, 4, 64)):
        mask = rand_mask(g, 2, 4, 300, 300, bs, 0.6) if case == "mask" else None
        lists = (None, None)
        if mask is not None:
            layout = BlockLayout.from_mask(mask, bs)
            lists = (layout.kv_num_blocks, layout.kv_indices)
        config = dict(BLOCK_M=bm, BLOCK_N=64, W_DOT=0, num_warps=warps, num_stages=3, TMA=1)
        plan = triton_attn.make_plan(q, k, v, *lists, rh, rw, None, D**-0.5, bs, config=config)
        for _ in range(2):  # the second call goes through the compiled kernel's own launcher, new descriptors
            out = torch.full(q.shape, float("nan"), device="cuda", dtype=q.dtype)
            plan(q, k, v, *lists, rh, rw, None, None, out=out)
            check(out, q, k, v, mask, rh, rw, None, bs, seed=seed)
        assert plan.fast_path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nq,nk,bs", [(4096, 16, 128), (64, 32, 64), (7, 16, 64), (7, 4096, 128), (4096, 7, 128)])
def test_decoder_shapes_and_partial_blocks_tuned(dtype, nq, nk, bs):
    """SAM's decoder sides (i2t with 11 points: 4096 x 16 keys), through the tuned public API and layouts."""
    seed, g = seeded()
    q, k, v, _, _ = inputs(g, dtype, 2, nq, nk, 8, 8, 16)
    mask = rand_mask(g, 2, 8, nq, nk, bs, 0.7)
    out = block_sparse_attn(q, k, v, BlockLayout.from_mask(mask, bs))
    check(out, q, k, v, mask, bs=bs, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tuned_global_layer_and_fast_path(dtype):
    from sam_sparse.kernels import interface

    seed, g = seeded()
    q, k, v, rh, rw = inputs(g, dtype, 2, 4096, 4096, 12, 12, 64, rel=(64, 64), noncontig=True)
    mask = rand_mask(g, 2, 12, 4096, 4096, 128, 0.25)
    layout = BlockLayout.from_mask(mask, 128)
    first = block_sparse_attn(q, k, v, layout, rel_h=rh, rel_w=rw)
    second = block_sparse_attn(q, k, v, layout, rel_h=rh, rel_w=rw)
    plan = interface._PLANS[interface._fast_key(q, k, v, layout, rh, rw, None, None, None)]
    assert plan.fast_path, "the second call should launch the compiled kernel directly"
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    check(second, q, k, v, mask, rh, rw, seed=seed)


def test_new_batch_or_prompt_count_does_not_retune():
    from sam_sparse.kernels import triton_attn

    g = torch.Generator(device="cuda").manual_seed(0)
    for B, nt in ((1, 7), (3, 8), (5, 12), (2, 9)):
        q, k, v, _, _ = inputs(g, torch.bfloat16, B, nt, 4096, 8, 8, 16)
        block_sparse_attn(q, k, v)
        if B == 1:
            tuned = len(triton_attn._TUNED)
    assert len(triton_attn._TUNED) == tuned


@pytest.mark.parametrize("precision,bound", [("highest", 1e-5), ("high", 3e-3)])
def test_fp32_follows_matmul_precision(precision, bound):
    seed, g = seeded()
    q, k, v, rh, rw = inputs(g, torch.float32, 1, 4096, 4096, 4, 4, 64, rel=(64, 64), noncontig=True)
    with float32_settings(precision):
        out = block_sparse_attn(q, k, v, rel_h=rh, rel_w=rw)
    err = rel_error(out, oracle_attention(q, k, v, None, rh, rw))
    assert err < bound, f"seed {seed}: {precision}: relative error {err:.3g}"


@pytest.mark.parametrize("case", range(len(BIAS)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_neg_inf_bias_on_every_path(case, dtype):
    rel, tile, n, B, bs, _ = BIAS[case]
    seed, g = seeded()
    q, k, v, rh, rw = inputs(g, dtype, B, n, n, 2, 2, 64, rel=rel)
    rh = rh.masked_fill(rh > 1.5, float("-inf"))
    rw = rw.clone()
    rw[:, :, :3] = float("-inf")
    for cfg in ("wdot64", "64x64"):
        out = run(q, k, v, None, rh, rw, tile, bs, CFG[cfg])
        assert (out[:, :3] == 0).all(), f"seed {seed}"
        check(out, q, k, v, None, rh, rw, tile, bs, seed=seed)


def test_varlen_uneven_and_empty():
    seed, g = seeded()
    lens_q, lens_k = [5, 130, 257, 64, 9], [40, 0, 257, 64, 130]
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], device="cuda", dtype=torch.int32)
    for dtype in DTYPES:
        q = rnd(g, int(cu_q[-1]), 4, 64, dtype=dtype)
        k, v = rnd(g, int(cu_k[-1]), 2, 64, dtype=dtype), rnd(g, int(cu_k[-1]), 2, 64, dtype=dtype)
        m = torch.rand(5, 4, 5, 5, device="cuda", generator=g) < 0.6
        out = block_sparse_attn_varlen(q, k, v, cu_q, cu_k, 257, 257, m, block_size=64)
        assert (out[5:135] == 0).all()
        for i in (0, 2, 3, 4):
            qs, qe, ks, ke = (int(x) for x in (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]))
            mi = m[i : i + 1, :, : -(-(qe - qs) // 64), : -(-(ke - ks) // 64)]
            check(out[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], mi, bs=64, seed=seed)


def test_cuda_graph_capture_and_compile():
    seed, g = seeded()
    q, k, v, rh, rw = inputs(g, torch.bfloat16, 1, 4096, 4096, 4, 4, 64, rel=(64, 64))
    layout = BlockLayout.from_mask(rand_mask(g, 1, 4, 4096, 4096, 128, 0.3), 128)
    eager = block_sparse_attn(q, k, v, layout, rel_h=rh, rel_w=rw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = block_sparse_attn(q, k, v, layout, rel_h=rh, rel_w=rw)
    graph.replay()
    torch.testing.assert_close(captured, eager, rtol=0, atol=0)
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v: block_sparse_attn(q * 1.0, k, v, layout, rel_h=rh, rel_w=rw) + 1, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), eager + 1, rtol=2e-2, atol=2e-2)


def test_requires_grad_is_refused_on_cuda():
    q = torch.randn(1, 64, 2, 16, device="cuda", requires_grad=True)
    with pytest.raises(RuntimeError, match="inference-only"):
        block_sparse_attn(q, q, q)


# --- SamPredictor on CUDA under inference_mode ------------------------------------------------------------

def vit_b(seed=0):
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry["vit_b"]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # SAM zero-initializes the rel-pos tables: randomize them so they matter
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return sam.eval()


def low_res_logits(sam, image, points):
    from segment_anything import SamPredictor

    pred = SamPredictor(sam)
    with torch.inference_mode():
        pred.set_image(image)
        _, _, low = pred.predict(point_coords=np.array(points, float), point_labels=np.ones(len(points)))
    return torch.from_numpy(low).double()


def test_sam_predictor_inference_mode_dense_and_region_focused():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
    points = [[300, 200], [500, 400]]
    # The encoder, patched dense in fp32, against the unpatched encoder in float64: at most twice the
    # error of the unpatched encoder in fp32 (flash-attn's rule).
    x = torch.randn(1, 3, 1024, 1024, device="cuda")
    with torch.inference_mode():
        oracle = vit_b().double().cuda().image_encoder(x.double())
        err_sam = rel_error(vit_b().cuda().image_encoder(x), oracle)
        dense = vit_b().cuda()
        patch_sam(dense, "dense")
        err = rel_error(dense.image_encoder(x), oracle)
    assert err <= 2 * err_sam + 1e-6, f"dense patched fp32 encoder vs float64: {err:.3g}, SAM's own fp32: {err_sam:.3g}"
    # The whole predictor (SAM's prompt encoder does not run in float64): against the unpatched fp32 model.
    original = low_res_logits(vit_b().cuda(), image, points)
    err = rel_error(low_res_logits(dense, image, points), original)
    assert err < 20 * err_sam, f"dense patched SamPredictor vs original, fp32: {err:.3g}"
    # region_focused under inference_mode: per-prompt masks on the device; the CPU reference path of the
    # same patched model is the oracle's twin.
    # The bound: twice the distance between the unpatched model on CUDA and on the CPU (linears and
    # convolutions differ between cuBLAS and the CPU too).
    err_devices = rel_error(original, low_res_logits(vit_b(), image, points))
    rf_gpu = vit_b().cuda()
    patch_sam(rf_gpu, "region_focused")
    rf_cpu = vit_b()
    patch_sam(rf_cpu, "region_focused")
    a, b = low_res_logits(rf_gpu, image, points), low_res_logits(rf_cpu, image, points)
    err = rel_error(a, b)
    assert torch.isfinite(a).all() and err <= 2 * err_devices + 1e-5, f"region_focused CUDA vs CPU {err:.3g}, SAM {err_devices:.3g}"
