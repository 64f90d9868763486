"""The GPU suite for window_attn: the Triton kernel compiled for the card, in WINDOW mode (token grids
read in place, padding keys k_pad / v_pad), against the float64 oracle (tests/oracle.py,
oracle_window). Run it on a GPU machine whenever kernel or interface code changes:

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu

CI's CPU run collects and skips it (no CUDA). Every case draws fresh random inputs (the seed is in the
failure message), poisons the output with NaN before the kernel writes it, and checks per row and
globally against PyTorch doing the same computation in the inputs' dtype (same_dtype_window).
"""


import pytest
import torch

from gpu_helpers import DTYPES, FLOOR, GPU_MARKS, ROW_FLOOR, rnd, seeded
from oracle import check_window
from sam_sparse.kernels import BlockLayout, window_attn

pytestmark = GPU_MARKS

def inputs(g, dtype, B, GH, GW, H, Hk, D, window, rel=True, noncontig=True, pads=True):
    """q (B, GH, GW, H, D), k, v (B, GH, GW, Hk, D), k_pad, v_pad (Hk, D) or None, rel_h, rel_w or None."""
    if noncontig:  # strided views of one fused projection, as SAM's qkv gives them
        q, k, v = rnd(g, B, GH, GW, 3, H, D, dtype=dtype).unbind(3)
        k, v = k[..., :Hk, :], v[..., :Hk, :]
    else:
        q = rnd(g, B, GH, GW, H, D, dtype=dtype)
        k, v = rnd(g, B, GH, GW, Hk, D, dtype=dtype), rnd(g, B, GH, GW, Hk, D, dtype=dtype)
    k_pad, v_pad = (rnd(g, Hk, D, dtype=dtype), rnd(g, Hk, D, dtype=dtype)) if pads else (None, None)
    rel_h = rel_w = None
    if rel:  # (B, H, k, N) storage, as the patcher hands them over; sizeable, as SAM's are not at init
        rel_h = (rnd(g, B, H, window[0], GH * GW, dtype=dtype) * 2).transpose(-1, -2)
        rel_w = (rnd(g, B, H, window[1], GH * GW, dtype=dtype) * 2).transpose(-1, -2)
    return q, k, v, k_pad, v_pad, rel_h, rel_w


def n_windows(GH, GW, window):
    return -(-GH // window[0]) * -(-GW // window[1])


def check(out, q, k, v, window, k_pad, v_pad, mask=None, rel_h=None, rel_w=None, bs=128, seed=None, scale=None):
    """oracle.check_window with the GPU floors, after the launch has finished."""
    torch.cuda.synchronize()
    return check_window(out, q, k, v, window, k_pad, v_pad, mask, rel_h, rel_w, scale, bs, seed, FLOOR, ROW_FLOOR)


def run(q, k, v, window, k_pad, v_pad, mask=None, rel_h=None, rel_w=None, bs=128, config=None):
    """One launch into a NaN-poisoned output: a fixed config, or the tuned plan when config is None."""
    from sam_sparse.kernels import triton_attn

    out = torch.full(q.shape, float("nan"), device="cuda", dtype=q.dtype)
    layout = BlockLayout.from_mask(mask, bs) if mask is not None else None
    lists = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    Hk, D = k.shape[-2:]
    kp = (torch.zeros(Hk, D, device="cuda") if k_pad is None else k_pad).to(k.dtype).contiguous()
    vp = (torch.zeros(Hk, D, device="cuda") if v_pad is None else v_pad).to(v.dtype).contiguous()
    triton_attn.attention_triton(q, k, v, *lists, rel_h, rel_w, None, q.shape[-1] ** -0.5, bs, window=tuple(window),
                                 k_pad=kp, v_pad=vp, out=out, config=config)
    return out


CFG = {
    "64x64": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    "128x64": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    "64x128": dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    "tuned": None,
}

# (name, B, GH, GW, window, H, Hk): SAM's window layer (64 x 64 tokens in 14 x 14 windows, 5 x 5 windows of
# which the last row and column overhang by 6), and a small twin for the wide sweeps.
SAM = ("sam", 1, 64, 64, (14, 14), 2, 2)
SMALL = ("small", 2, 20, 20, (7, 7), 4, 2)


def _fits(dtype, D, cfg):
    """Configs the tuner could pick: fp32 and heads over 128 take tiles no larger than 64 x 64; 64 x 128
    tiles in 3 stages at headdim 128 need 237,568 bytes of shared memory, over an H200's 232,448 (the
    tuner drops such a config on OutOfResources; a fixed config would just fail to launch)."""
    c = CFG[cfg]
    if c is None:
        return True
    if cfg == "64x128" and D >= 128:
        return False
    return not ((dtype == torch.float32 or D > 128) and c["BLOCK_M"] * c["BLOCK_N"] > 64 * 64)


@pytest.mark.parametrize("dtype,D,cfg", [
    (d, D, c) for d in DTYPES for D in (64, 80, 128) for c in CFG if c != "tuned" and _fits(d, D, c)])
def test_sam_window_layer_configs(dtype, D, cfg):
    seed, g = seeded()
    _, B, GH, GW, win, H, Hk = SAM
    q, k, v, kp, vp, rh, rw = inputs(g, dtype, B, GH, GW, H, Hk, D, win)
    check(run(q, k, v, win, kp, vp, None, rh, rw, 128, CFG[cfg]), q, k, v, win, kp, vp, None, rh, rw, seed=seed)


@pytest.mark.parametrize("dtype,D", [(d, D) for d in DTYPES for D in (16, 64, 80, 128, 256)
                                     if not (D == 256 and d == torch.float32)])
def test_head_dims_gqa_small_grid(dtype, D):
    """Batch 2, GQA 4 / 2, 20 x 20 grid in 7 x 7 windows; 256 only in 16-bit dtypes, with 64 x 64 tiles."""
    seed, g = seeded()
    _, B, GH, GW, win, H, Hk = SMALL
    q, k, v, kp, vp, rh, rw = inputs(g, dtype, B, GH, GW, H, Hk, D, win)
    check(run(q, k, v, win, kp, vp, None, rh, rw, 128, CFG["64x64"]), q, k, v, win, kp, vp, None, rh, rw, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [SAM, SMALL], ids=lambda s: s[0])
def test_tuned_plan(dtype, shape):
    """config=None: the plan the tuner picks for the window signature, contiguous inputs, MQA."""
    seed, g = seeded()
    _, B, GH, GW, win, H, _ = shape
    q, k, v, kp, vp, rh, rw = inputs(g, dtype, B, GH, GW, H, 1, 64, win, noncontig=False)
    check(run(q, k, v, win, kp, vp, None, rh, rw, 128, None), q, k, v, win, kp, vp, None, rh, rw, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_mask_with_empty_query_block(dtype):
    """block_size 64 over 196 tokens: 4 x 4 blocks per window (the last ones partial); one mask per
    (image, window) and head; an empty query-block row gives zeros for its queries, never NaN."""
    seed, g = seeded()
    B, GH, GW, win, H, Hk, bs = 2, 64, 64, (14, 14), 2, 1, 64
    q, k, v, kp, vp, rh, rw = inputs(g, dtype, B, GH, GW, H, Hk, 64, win)
    nw = n_windows(GH, GW, win)
    mask = torch.rand(B * nw, H, 4, 4, device="cuda", generator=g) < 0.6
    mask[..., -1] = True  # the partial last key block in play
    mask[0, 0, 0] = False  # window 0 of image 0, head 0: queries 0..63 (rows 0-4 of the window) see nothing
    mask[nw + 24, 1, 1] = False  # the last window of image 1 (overhanging both edges), head 1: rows 4-9 of it
    ref = None
    for cfg in ("64x64", "tuned"):
        out = run(q, k, v, win, kp, vp, mask, rh, rw, bs, CFG[cfg])
        ref = check(out, q, k, v, win, kp, vp, mask, rh, rw, bs, seed)
        # query block 0 of window 0: its rows 0-3 and the first 8 tokens of row 4
        assert (out[0, :4, :14, 0] == 0).all() and (out[0, 4, :8, 0] == 0).all(), f"seed {seed}: {cfg}"
    assert (ref[0, :4, :14, 0] == 0).all(), f"seed {seed}: the oracle disagrees about the empty block"


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_rel_pos_on_every_key(dtype):
    """-inf rel_h on every key row for some queries (nothing left: zeros), on one key row for others."""
    seed, g = seeded()
    _, B, GH, GW, win, H, Hk = SAM
    q, k, v, kp, vp, rh, rw = inputs(g, dtype, B, GH, GW, H, Hk, 80, win)
    rh, rw = rh.clone(), rw.clone()
    rh[:, :, :70] = float("-inf")  # grid row 0 and the first 6 tokens of row 1: every key excluded
    rh[:, :, 100:200, 3] = float("-inf")  # window row 3 excluded
    rw[:, :, 300:400, :5] = float("-inf")  # window columns 0-4 excluded
    for cfg in ("64x64", "64x128"):
        if not _fits(dtype, 80, cfg):
            continue
        out = run(q, k, v, win, kp, vp, None, rh, rw, 128, CFG[cfg])
        assert (out[:, 0] == 0).all() and (out[:, 1, :6] == 0).all(), f"seed {seed}: {cfg}"
        check(out, q, k, v, win, kp, vp, None, rh, rw, seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", ["wdot", "64x64"])
def test_power_of_two_window_rect_paths(dtype, cfg):
    """A 8 x 16 window (not SAM's, but the rectangle bias path, rel_w hoisted / rel_w @ I in bf16)."""
    seed, g = seeded()
    win = (8, 16)
    q, k, v, kp, vp, rh, rw = inputs(g, dtype, 2, 20, 36, 2, 1, 64, win)
    config = dict(BLOCK_M=64, BLOCK_N=16, W_DOT=1, num_warps=4, num_stages=3) if cfg == "wdot" else CFG[cfg]
    check(run(q, k, v, win, kp, vp, None, rh, rw, 128, config), q, k, v, win, kp, vp, None, rh, rw, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_api_fast_path(dtype):
    """window_attn itself: validation, the tuned plan, pads None (zeros), a BlockLayout; the second call
    reuses the plan and gives the same bits; under torch.inference_mode."""
    seed, g = seeded()
    B, GH, GW, win, H, Hk, bs = 1, 64, 64, (14, 14), 4, 2, 64
    q, k, v, _, _, rh, rw = inputs(g, dtype, B, GH, GW, H, Hk, 64, win, pads=False)
    mask = torch.rand(1, H, 4, 4, device="cuda", generator=g) < 0.7
    mask[0, 0, 1] = False
    layout = BlockLayout.from_mask(mask, bs)
    with torch.inference_mode():
        first = window_attn(q, k, v, win, layout, rel_h=rh, rel_w=rw)
        second = window_attn(q, k, v, win, layout, rel_h=rh, rel_w=rw)
    torch.testing.assert_close(first, second, rtol=0, atol=0, msg=f"seed {seed}")
    check(second, q, k, v, win, None, None, mask, rh, rw, bs, seed)
