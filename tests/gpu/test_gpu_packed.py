"""The GPU suite on two launch forms of Hiera's windows and head dims: packed windows (several small windows per
program, block-diagonal: hiera's 4 x 4 windows and its pooled blocks) and head dim 56 through TMA (one 64-column
chunk whose columns past the head dim arrive as zeros from the descriptor). A file of its own, so that the suite's
workers (--dist loadfile) run it beside test_gpu_hiera.py.

Kernel cases are checked against the float64 oracle (tests/oracle.py) globally and per row, on fresh random inputs
(the seed in each message), into NaN-poisoned outputs.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_gpu_packed.py
"""

import pytest
import torch

from gpu_helpers import DTYPES, FLOOR, GPU_MARKS, ROW_FLOOR, check_rows, rnd, seeded
from oracle import check_window
from sam_sparse.kernels import window_attn

pytestmark = GPU_MARKS


# Packed windows (triton_attn's PACK): several windows side by side per program, block-diagonal. (key grid side,
# key window, query window or None, heads, head dim): hiera_l's stage-2 windows, its pooled blocks into stages 2
# and 3, at head dims 72 (overlapping chunk), 56 (masked chunk) and 96 (exact split).
PACKED_CASES = [(128, 4, None, 4, 72), (64, 8, 4, 2, 56), (64, 4, 2, 4, 96), (32, 4, None, 2, 56)]
PACKED_CONFIGS = [  # (PACK, BLOCK_M, BLOCK_N, warps, TMA)
    (2, 32, 32, 4, 0), (4, 64, 64, 4, 0), (4, 64, 64, 4, 1), (8, 128, 64, 8, 0), (8, 128, 64, 8, 1), (8, 128, 128, 8, 0),
    (16, 64, 64, 4, 0), (16, 64, 32, 4, 1), (32, 128, 64, 8, 1), (4, 64, 16, 4, 0)]


@pytest.mark.parametrize("case", PACKED_CASES, ids=lambda c: f"{c[0]}w{c[1]}q{c[2]}-H{c[3]}-D{c[4]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_windows_every_config(case, dtype):
    """Every packed config that fits the case (pointer loads and TMA boxes of the packed key rectangle; one and
    several key steps), then the tuned plan (packed candidates offered), against the float64 oracle per row,
    into NaN-poisoned outputs, q / k / v strided views of one projection; pooled q where the case has one."""
    import triton

    from sam_sparse.kernels import triton_attn

    side, w, qw, heads, d = case
    seed, g = seeded()
    q, k, v = rnd(g, 2, side, side, 3, heads, d, dtype=dtype).unbind(3)
    if qw is not None:
        q = q.unflatten(1, (side // 2, 2)).unflatten(3, (side // 2, 2)).amax(dim=(2, 4))
    q_win = None if qw is None else (qw, qw)
    zeros = torch.zeros(heads, d, device="cuda", dtype=dtype)
    ran, tma_ran = [], 0
    for pack, bm, bn, warps, tma in PACKED_CONFIGS:
        cols = side // w
        nq, nk = (qw or w) ** 2 * pack, w * w * pack
        if cols % pack or bm > max(nq, 16) * 2 or bn > nk or (tma and dtype == torch.float32):
            continue  # PACK must divide a grid row's windows; tiles no larger than the packed windows
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=3, PACK=pack, TMA=tma)
        plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, d ** -0.5, 128, window=(w, w),
                                     q_window=q_win, config=cfg)
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
        try:
            plan(q, k, v, None, None, None, None, None, None, zeros, zeros, out=out)
        except triton.runtime.errors.OutOfResources:
            continue  # fp32's 128-row tiles: more shared memory than the GPU has (the tuner skips them too)
        torch.cuda.synchronize()
        tma_ran += plan._tma is not None
        check_window(out, q, k, v, (w, w), zeros, zeros, None, None, None, None, 128, f"{seed} (config {cfg})", FLOOR,
                     ROW_FLOOR, q_window=q_win)
        ran.append(cfg)
    assert len(ran) >= 2, f"only {ran} ran"
    if d == 72 and dtype != torch.float32 and torch.cuda.get_device_capability()[0] >= 9:
        assert tma_ran, "no packed config read K / V through TMA"  # head dim 72's chunks are exact TMA boxes
    out = window_attn(q, k, v, (w, w), q_window_size=q_win)
    torch.cuda.synchronize()
    check_window(out, q, k, v, (w, w), zeros, zeros, None, None, None, None, 128, f"{seed} (tuned)", FLOOR, ROW_FLOOR,
                 q_window=q_win)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_wide_chunk_through_tma_reads_no_column_past_the_head_dim(dtype):
    """Head dim 56 (hiera_b+) runs as one 64-column chunk; through TMA its boxes reach past the head dim, where the
    descriptor gives zeros. q / k / v here are views of buffers whose columns 56-63 hold NaN: a byte read there
    shows up as NaN. A global block (sequence boxes, the tuned plan and every TMA config) and 16 x 16 windows (whole
    rows of a window), against the float64 oracle per row, into NaN-poisoned outputs."""
    from sam_sparse.kernels import triton_attn

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or later GPU")
    seed, g = seeded()
    buf = torch.full((2, 1024, 3, 4, 64), float("nan"), device="cuda", dtype=dtype)
    buf[..., :56] = rnd(g, 2, 1024, 3, 4, 56, dtype=dtype)
    q, k, v = buf[..., :56].unbind(2)
    ran = 0
    for cfg in (None, *[c for c in triton_attn._configs() if c.get("TMA") and not c.get("WIDE")]):
        plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, 56 ** -0.5, 128, config=cfg)
        out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
        plan(q, k, v, None, None, None, None, None, None, out=out)
        check_rows(out, q, k, v, None, 128, f"{seed} (config {plan.config})")
        ran += plan._tma is not None
    assert ran >= 3, f"only {ran} plans read K / V through TMA"
    grid = torch.full((1, 32, 32, 3, 2, 64), float("nan"), device="cuda", dtype=dtype)
    grid[..., :56] = rnd(g, 1, 32, 32, 3, 2, 56, dtype=dtype)
    q, k, v = grid[..., :56].unbind(3)
    zeros = torch.zeros(2, 56, device="cuda", dtype=dtype)
    plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, 56 ** -0.5, 128, window=(16, 16),
                                 config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, TMA=1))
    assert plan._tma is not None
    out = torch.full(q.shape, float("nan"), device="cuda", dtype=dtype)
    plan(q, k, v, None, None, None, None, None, None, zeros, zeros, out=out)
    torch.cuda.synchronize()
    check_window(out, q, k, v, (16, 16), zeros, zeros, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR)
