"""The GPU suite on SAM 2's shapes: Hiera's global blocks (4096 tokens, head dims 96 / 56 / 72), its
windowed blocks read in place (8 x 8 windows on a 256 x 256 grid; stage 3's 14 x 14 on 64 x 64, the overhanging ones
cropped to the grid, 196 keys as full steps and a narrow tail), its q-pooled blocks (a pooled window attending to the
full one, with and without padding windows), and whole SAM 2.1 image models patched
dense against sam2's own forward (random weights, sharpened attention).

Kernel cases are checked against the float64 oracle (tests/oracle.py) globally and per row, on fresh
random inputs (the seed in each message), into NaN-poisoned outputs.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu
"""

import pytest
import torch

from gpu_helpers import DTYPES, FLOOR, GPU_MARKS, ROW_FLOOR, check_rows, rnd, seeded
from oracle import check_window
from sam_sparse.kernels import BlockLayout, block_sparse_attn, window_attn

pytestmark = GPU_MARKS

HIERA = {"hiera_t": (4, 96), "hiera_b+": (8, 56), "hiera_l": (8, 72)}  # stage-3 (heads, head dim)


@pytest.mark.parametrize("model", HIERA)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hiera_global_block(model, dtype):
    """A global block at 1024 px: 64 x 64 = 4096 tokens, q / k / v views of one qkv projection, the tuned
    plan; dense, and a block mask with an empty query block."""
    seed, g = seeded()
    heads, d = HIERA[model]
    q, k, v = rnd(g, 1, 4096, 3, heads, d, dtype=dtype).unbind(2)
    out = block_sparse_attn(q, k, v)
    check_rows(out, q, k, v, None, 128, seed)
    mask = torch.rand(1, heads, 32, 32, device="cuda", generator=g) < 0.3
    mask[0, 0, 3] = False
    out = block_sparse_attn(q, k, v, BlockLayout.from_mask(mask, 128))
    check_rows(out, q, k, v, mask, 128, seed)
    assert (out[0, 3 * 128:4 * 128, 0] == 0).all(), f"seed {seed}: an empty query block must give zeros"


@pytest.mark.parametrize("heads,d", [(1, 96), (2, 56), (2, 72)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hiera_stage1_windows_in_place(heads, d, dtype):
    """Stage 1 at 1024 px: 8 x 8 windows on the 256 x 256 grid (1024 windows), read in place."""
    seed, g = seeded()
    q, k, v = rnd(g, 1, 256, 256, 3, heads, d, dtype=dtype).unbind(3)
    zeros = torch.zeros(heads, d, device="cuda", dtype=dtype)
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
    out.copy_(window_attn(q, k, v, (8, 8)))
    torch.cuda.synchronize()
    check_window(out, q, k, v, (8, 8), zeros, zeros, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR)


# (key grid, key window, heads, head dim): Hiera's stage changes at 1024 px; 64 -> 14 overhangs (70).
POOLED = [((128, 128), 8, 2, 96), ((64, 64), 4, 4, 56), ((64, 64), 14, 8, 72), ((64, 64), 16, 8, 72)]


@pytest.mark.parametrize("case", POOLED, ids=lambda c: f"{c[0][0]}w{c[1]}-H{c[2]}-D{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_hiera_pooled_windows(case, dtype):
    """A q-pooled block: q max-pooled by 2 over the grid, each pooled window attending to its full window
    of keys; padding keys (the qkv bias) where windows overhang; a block mask with an empty query block."""
    seed, g = seeded()
    (gh, gw), w, heads, d = case
    qkv = rnd(g, 1, gh, gw, 3, heads, d, dtype=dtype)
    q, k, v = qkv.unbind(3)
    q = q.unflatten(1, (gh // 2, 2)).unflatten(3, (gw // 2, 2)).amax(dim=(2, 4))
    kp, vp = rnd(g, heads, d, dtype=dtype), rnd(g, heads, d, dtype=dtype)
    n_win = -(-gh // w) * -(-gw // w)
    qb, kb = -(-(w * w // 4) // 16), -(-(w * w) // 16)
    mask = torch.rand(n_win, heads, qb, kb, device="cuda", generator=g) < 0.6
    mask[0, 0, 0] = False
    for m in (None, mask):
        out = window_attn(q, k, v, (w, w), None if m is None else BlockLayout.from_mask(m, 16),
                          q_window_size=(w // 2, w // 2), k_pad=kp, v_pad=vp, block_size=16)
        torch.cuda.synchronize()
        check_window(out, q, k, v, (w, w), kp, vp, m, None, None, None, 16, seed, FLOOR, ROW_FLOOR,
                     q_window=(w // 2, w // 2))


@pytest.mark.parametrize("model_type", ["sam2.1_hiera_t", "sam2.1_hiera_b+", "sam2.1_hiera_l"])
def test_sam2_image_encoder_dense_matches_sam2(model_type):
    """The whole image encoder at 1024 px, patched dense vs sam2's own: fp32 (3xTF32 on both sides, as
    torch's 'highest' precision) and bf16 autocast, as SAM 2's README runs it."""
    from sam2_helpers import small_sam2

    from sam_sparse import patch_sam

    model = small_sam2(model_type, image_size=1024).cuda()
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    for dtype, floor in ((torch.float32, 0.99999), (torch.bfloat16, 0.999)):
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            ref = model.image_encoder(x)
            handle = patch_sam(model, "dense")
            out = model.image_encoder(x)
            handle.restore()
        for a, b in zip([out["vision_features"], *out["backbone_fpn"]], [ref["vision_features"], *ref["backbone_fpn"]]):
            cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()
            assert cos >= floor, f"{model_type} {dtype}: cosine {cos}"


def test_sam2_predictor_and_compile():
    """SAM2ImagePredictor on the GPU with bf16 autocast: the patched model's masks against sam2's own, and
    the patched image encoder under torch.compile equal to eager."""
    import numpy as np
    from sam2_helpers import photo, small_sam2

    from sam_sparse import patch_sam
    from sam_sparse.patches.sam2 import image_predictor

    model = small_sam2("sam2.1_hiera_t", image_size=1024).cuda()
    predictor = image_predictor(model)
    image = photo(600, 800, seed=3)
    pts = np.array([[200, 300], [600, 150], [420, 420]])

    def masks():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            predictor.set_image(image)
            return [predictor.predict(point_coords=p[None], point_labels=np.array([1]))[0] for p in pts]

    ref = masks()
    handle = patch_sam(model, "dense")
    out = masks()
    for a, b in zip(out, ref):
        inter, union = (a.astype(bool) & b.astype(bool)).sum(), (a.astype(bool) | b.astype(bool)).sum()
        assert union == 0 or inter / union >= 0.98, inter / union
    x = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
    encoder = model.image_encoder.to(torch.bfloat16)
    compiled = torch.compile(encoder)
    with torch.inference_mode():
        eager, comp = encoder(x)["vision_features"], compiled(x)["vision_features"]
    cos = torch.nn.functional.cosine_similarity(eager.double().flatten(), comp.double().flatten(), dim=0).item()
    assert cos >= 0.999, cos
    handle.restore()
    torch._dynamo.reset()


# The overlapping second chunk (triton_attn.OVERLAP_SECOND_CHUNK, on since run 63 passed these): hiera_l's
# head dim 72 as columns 0-63 and 56-71 instead of one 128-wide chunk. Its earlier form (a second chunk with
# masked columns) passed every interpreter test and failed on an H200, so each launch config the tuner may
# pick at these shapes is forced here, TMA and split-K among them, then the tuner.
OVERLAP_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=1),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=1),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, SPLIT_K=3),
    None,  # tuned
]


@pytest.fixture
def overlap_on(monkeypatch):
    from sam_sparse.kernels import triton_attn

    monkeypatch.setattr(triton_attn, "OVERLAP_SECOND_CHUNK", True)
    return triton_attn


@pytest.mark.parametrize("d,dtype", [(72, torch.bfloat16), (72, torch.float16), (72, torch.float32),
                                     (40, torch.bfloat16), (88, torch.float16)])
def test_overlapping_chunk_global_every_config(overlap_on, d, dtype):
    """A global block (4096 tokens, 8 heads, q / k / v views of one projection) with the overlapping chunk,
    through every config above, with a block mask that has an empty query block."""
    d0, d1, at = overlap_on.head_dim_chunks(d)
    assert d1 and at < d0, "this test is meant to run the overlapping chunk"
    seed, g = seeded()
    q, k, v = rnd(g, 1, 4096, 3, 8, d, dtype=dtype).unbind(2)
    mask = torch.rand(1, 8, 32, 32, device="cuda", generator=g) < 0.5
    mask[0, 3, 5] = False
    layout = BlockLayout.from_mask(mask, 128)
    if dtype != torch.float32 and torch.cuda.get_device_capability()[0] >= 9:
        assert overlap_on.tma_eligible(k, v, d0, at), "the TMA configs should read K and V through descriptors here"
    checked = 0
    for cfg in OVERLAP_CONFIGS:
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
        try:
            overlap_on.attention_triton(q, k, v, layout.kv_num_blocks, layout.kv_indices, None, None, None,
                                        d ** -0.5, 128, out=out, config=cfg)
        except overlap_on.triton.runtime.errors.OutOfResources:
            continue  # the tuner skips a config this GPU cannot fit the same way
        check_rows(out, q, k, v, mask, 128, f"{seed} (config {cfg})")
        assert (out[0, 5 * 128:6 * 128, 3] == 0).all(), f"seed {seed} (config {cfg}): the empty block must give zeros"
        checked += 1
    assert checked >= len(OVERLAP_CONFIGS) - 2, f"only {checked} configs fit this GPU"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_overlapping_chunk_windows(overlap_on, dtype):
    """hiera_l's windowed and q-pooled blocks at head dim 72 with the overlapping chunk, tuned: stage 1's
    8 x 8 windows on the 256 x 256 grid, and stage 3's first block (q pooled, windows of 16 on 64 x 64,
    the padding keys of overhanging windows of 14 too)."""
    seed, g = seeded()
    q, k, v = rnd(g, 1, 256, 256, 3, 2, 72, dtype=dtype).unbind(3)
    zeros = torch.zeros(2, 72, device="cuda", dtype=dtype)
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
    overlap_on.attention_triton(q, k, v, None, None, None, None, None, 72 ** -0.5, 128, window=(8, 8), k_pad=zeros,
                                v_pad=zeros, out=out)
    torch.cuda.synchronize()
    check_window(out, q, k, v, (8, 8), zeros, zeros, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR)
    for w in (16, 14):
        qkv = rnd(g, 1, 64, 64, 3, 8, 72, dtype=dtype)
        q, k, v = qkv.unbind(3)
        q = q.unflatten(1, (32, 2)).unflatten(3, (32, 2)).amax(dim=(2, 4))
        kp, vp = rnd(g, 8, 72, dtype=dtype), rnd(g, 8, 72, dtype=dtype)
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
        overlap_on.attention_triton(q, k, v, None, None, None, None, None, 72 ** -0.5, 16, window=(w, w),
                                    q_window=(w // 2, w // 2), k_pad=kp, v_pad=vp, out=out)
        torch.cuda.synchronize()
        check_window(out, q, k, v, (w, w), kp, vp, None, None, None, None, 16, f"{seed} (window {w})", FLOOR,
                     ROW_FLOOR, q_window=(w // 2, w // 2))


# Windows whose key tiles are whole rows (power-of-two widths: all of hiera_l's) can read K and V through TMA:
# one (rows, width) box of the key grid per step, zeros past the grid's edge (the padding keys of overhanging
# windows are added from those zeros, as on the pointer path). Each case forces TMA configs whose boxes differ.
WINDOW_TMA_CASES = [
    # (grid, window, q_window, heads, head dim, dtype)
    ((64, 64), (16, 16), None, 8, 72, torch.bfloat16),  # hiera_l stage 3
    ((56, 48), (16, 16), None, 2, 72, torch.float16),  # overhanging windows: padding keys
    ((64, 64), (16, 16), (8, 8), 4, 72, torch.bfloat16),  # q-pooled into stage 4
    ((36, 40), (8, 8), None, 2, 80, torch.bfloat16),  # 8 x 8 windows, overhanging, head dim 80 = 64 + 16
    ((32, 32), (8, 8), None, 4, 96, torch.float16),  # head dim 96 = 64 + 32
    ((20, 16), (4, 4), None, 2, 64, torch.bfloat16),  # 4 x 4 windows: 16-key tiles
]
WINDOW_TMA_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=1),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, TMA=1),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=1),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, TMA=1),
    dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2, TMA=1),
    dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=3, TMA=1),
]


@pytest.mark.parametrize("case", WINDOW_TMA_CASES, ids=lambda c: f"{c[0][0]}x{c[0][1]}w{c[1][0]}q{c[2]}-H{c[3]}-D{c[4]}")
def test_windows_through_tma(case):
    """Window attention with K / V read through TMA boxes, every config whose box fits the window, against the
    float64 oracle per row, into NaN-poisoned outputs; one config also under a block mask with an empty query
    block, and one with rel-pos terms. Fails if no config took the TMA path (Hopper only)."""
    from sam_sparse.kernels import triton_attn

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or later GPU")
    (gh, gw), win, q_win, heads, d, dtype = case
    seed, g = seeded()
    q, k, v = rnd(g, 2, gh, gw, 3, heads, d, dtype=dtype).unbind(3)  # strided views of one projection
    if q_win is not None:
        q = q.unflatten(1, (gh // 2, 2)).unflatten(3, (gw // 2, 2)).amax(dim=(2, 4))
    kp, vp = rnd(g, heads, d, dtype=dtype), rnd(g, heads, d, dtype=dtype)
    ran = 0
    for cfg in WINDOW_TMA_CONFIGS:
        plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, d ** -0.5, 128, window=win, q_window=q_win,
                                     config=cfg)
        if all(p._tma is None for p in getattr(plan, "plans", [plan])):
            continue  # the config's key tile is no box of this window
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
        plan(q, k, v, None, None, None, None, None, None, kp, vp, out=out)
        torch.cuda.synchronize()
        check_window(out, q, k, v, win, kp, vp, None, None, None, None, 128, f"{seed} (config {cfg})", FLOOR, ROW_FLOOR,
                     q_window=q_win)
        ran += 1
    assert ran >= 2, f"only {ran} TMA configs ran on windows {win}"
    # A block mask with an empty query block, then rel-pos terms (the one-hot bias path), through TMA.
    qn, kn = (q_win or win)[0] * (q_win or win)[1], win[0] * win[1]
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2, TMA=1)
    windows = -(-k.shape[1] // win[0]) * -(-k.shape[2] // win[1])
    mask = torch.rand(2 * windows, heads, -(-qn // 16), -(-kn // 16), device="cuda", generator=g) < 0.5
    mask[1, 0, 0] = False
    layout = BlockLayout.from_mask(mask, 16)
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
    triton_attn.attention_triton(q, k, v, layout.kv_num_blocks, layout.kv_indices, None, None, None, d ** -0.5, 16,
                                 window=win, q_window=q_win, k_pad=kp, v_pad=vp, out=out, config=cfg)
    torch.cuda.synchronize()
    check_window(out, q, k, v, win, kp, vp, mask, None, None, None, 16, f"{seed} (mask)", FLOOR, ROW_FLOOR,
                 q_window=q_win)
    rel_h = rnd(g, 2, heads, q.shape[1] * q.shape[2], win[0], dtype=dtype)
    rel_w = rnd(g, 2, heads, q.shape[1] * q.shape[2], win[1], dtype=dtype)
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
    triton_attn.attention_triton(q, k, v, None, None, rel_h, rel_w, None, d ** -0.5, 16, window=win, q_window=q_win,
                                 k_pad=kp, v_pad=vp, out=out, config=cfg)
    torch.cuda.synchronize()
    check_window(out, q, k, v, win, kp, vp, None, rel_h, rel_w, None, 16, f"{seed} (rel-pos)", FLOOR, ROW_FLOOR,
                 q_window=q_win)


def test_host_scale_windows_tune_apart_and_stay_exact(monkeypatch):
    """hiera_l's 16 x 16 windows at batch 1 are host-scale (triton_attn.HOST_SCALE_WORK): their own tuning class,
    with the pointer-load twins of the TMA tiles among its candidates, ranked by max(GPU, host + OP_HOST_US); at
    batch 8 the class of GPU time and TMA tiles only. Whatever each class picks is checked against the float64
    oracle per row, into NaN-poisoned outputs."""
    from sam_sparse.kernels import triton_attn

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the TMA twins are a Hopper question")
    monkeypatch.setattr(triton_attn, "_TUNED", {})
    monkeypatch.setenv("SAM_SPARSE_TUNE_CACHE", "0")
    tuned = []
    real = triton_attn._tune
    monkeypatch.setattr(triton_attn, "_tune", lambda key, cands, *a, **kw: tuned.append((key, cands)) or real(key, cands, *a, **kw))
    seed, g = seeded()
    for batch in (1, 8):
        q, k, v = rnd(g, batch, 64, 64, 3, 8, 72, dtype=torch.bfloat16).unbind(3)
        kp, vp = rnd(g, 8, 72, dtype=torch.bfloat16), rnd(g, 8, 72, dtype=torch.bfloat16)
        plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, 72 ** -0.5, 128, window=(16, 16))
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=q.dtype)
        plan(q, k, v, None, None, None, None, None, None, kp, vp, out=out)
        torch.cuda.synchronize()
        check_window(out, q, k, v, (16, 16), kp, vp, None, None, None, None, 128, f"{seed} (batch {batch}, "
                     f"{plan.config})", FLOOR, ROW_FLOOR)
    (key1, cands1), (key8, cands8) = tuned
    assert key1[-1] is True and key8[-1] is False, (key1, key8)
    assert key1[:-1] == key8[:-1], "only the host-scale flag separates the two classes"
    assert any(not c.get("TMA") for c in cands1) and any(c.get("TMA") for c in cands1), cands1
    assert all(c.get("TMA") for c in cands8), cands8


# Stage 3 of hiera_t / s / b+ at 1024 px: 14 x 14 windows on the 64 x 64 grid, the last row and column of windows
# overhanging it by 6 (cropped to 8 tokens: triton_attn.CROP_WINDOWS), 196 keys per window (3 x 64 + a 16-key tail:
# TAIL_KEYS); and the q-pooled block into stage 4 (7 x 7 query windows, cropped to 4).
STAGE3_14 = [(8, 56, False), (4, 96, False), (16, 56, True)]


@pytest.mark.parametrize("case", STAGE3_14, ids=lambda c: f"H{c[0]}-D{c[1]}{'-pooled' if c[2] else ''}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cropped_tail", [True, False], ids=["cropped-tail", "padded-masked"])
def test_hiera_windows_14_cropped_with_key_tail(case, dtype, cropped_tail, monkeypatch):
    """The tuned plan and fixed configs, with the overhanging windows cropped and the keys' last partial step as a
    narrow tile (the defaults) and without either, into NaN-poisoned outputs, against the float64 oracle per row,
    with random padding keys and values (the qkv bias)."""
    from sam_sparse.kernels import triton_attn

    monkeypatch.setattr(triton_attn, "CROP_WINDOWS", cropped_tail)
    monkeypatch.setattr(triton_attn, "TAIL_KEYS", cropped_tail)
    seed, g = seeded()
    heads, d, pooled = case
    q, k, v = rnd(g, 2, 64, 64, 3, heads, d, dtype=dtype).unbind(3)
    q_win = None
    if pooled:
        q, q_win = q.unflatten(1, (32, 2)).unflatten(3, (32, 2)).amax(dim=(2, 4)), (7, 7)
    kp, vp = rnd(g, heads, d, dtype=dtype), rnd(g, heads, d, dtype=dtype)
    configs = [None, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
               dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)]
    for cfg in configs:
        if dtype == torch.float32 and cfg is not None and cfg["BLOCK_M"] * cfg["BLOCK_N"] > 64 * 64:
            continue  # fp32 tiles past 64 x 64 do not fit in shared memory at these head dims
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
        triton_attn.attention_triton(q, k, v, None, None, None, None, None, d ** -0.5, 128, window=(14, 14),
                                     q_window=q_win, k_pad=kp, v_pad=vp, out=out, config=cfg)
        torch.cuda.synchronize()
        check_window(out, q, k, v, (14, 14), kp, vp, None, None, None, None, 128, f"{seed} (config {cfg})", FLOOR,
                     ROW_FLOOR, q_window=q_win)
