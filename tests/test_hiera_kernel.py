"""The kernel on SAM 2's Hiera shapes: head dims 56 / 72 / 96 (none a power of two), windows of 8 x 8 on a
grid with many windows, and q-pooled windows (queries on a grid pooled by 2, each query window attending to
the key window twice its size), against the float64 oracle of tests/oracle.py.

Three implementations: the PyTorch reference (window_attn and block_sparse_attn on CPU tensors) and the
Triton kernel in Triton's interpreter. Fresh random inputs every case, the seed in each failure message;
the kernel writes into an output poisoned with NaN first.
"""

import inspect

import pytest
import torch

from oracle import check_varlen, check_window, oracle_attention, packed_inputs, rel_error, same_dtype_torch
from sam_sparse.kernels import BlockLayout, block_lists, window_attn
from sam_sparse.kernels.interface import HAS_TRITON, HEAD_DIMS
from sam_sparse.kernels.triton_attn import head_dim_chunks

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROW_FLOOR = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}
HIERA_HEAD_DIMS = (56, 72, 96)  # hiera_b+, hiera_l, hiera_t / s


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


def pooled_inputs(g, B, GH, GW, H, D, dtype):
    """Hiera's q-pooled block: q, k, v views of one (B, GH, GW, 3, H, D) projection; q max-pooled by 2 over
    the grid (B, GH / 2, GW / 2, H, D), as MultiScaleAttention pools it; pads (H, D) as a projection bias."""
    qkv = torch.randn(B, GH, GW, 3, H, D, generator=g).to(dtype)
    q, k, v = qkv.unbind(3)
    pooled = torch.nn.functional.max_pool2d(q.reshape(B, GH, GW, H * D).permute(0, 3, 1, 2).float(), 2)
    q = pooled.permute(0, 2, 3, 1).reshape(B, GH // 2, GW // 2, H, D).to(dtype)
    return q, k, v, torch.randn(H, D, generator=g).to(dtype), torch.randn(H, D, generator=g).to(dtype)


@pytest.fixture
def overlap_kernel(triton_kernel, monkeypatch):
    """The kernel with OVERLAP_SECOND_CHUNK on: 72 as columns 0-63 and 56-71 (40: 0-31 and 24-39; 88: 0-63
    and 56-87; 136: 0-127 and 120-135) instead of one chunk of 128 (64, 128, 256) with the columns past the
    head dim masked."""
    monkeypatch.setattr(triton_kernel, "OVERLAP_SECOND_CHUNK", True)
    return triton_kernel


def test_head_dim_split_costs(monkeypatch):
    """Head dims run without a padded copy: exact power-of-two chunks (96 = 64 + 32, 80 = 64 + 16), else one
    masked chunk of the next power of two (56 -> 64: 14% more MMA work; 72 -> 128: 78%), or with
    OVERLAP_SECOND_CHUNK a second chunk that ends at the last column (72 -> 64 + 16 from column 56: 11%)
    wherever that is less work than the padded chunk."""
    from sam_sparse.kernels import triton_attn

    monkeypatch.setattr(triton_attn, "OVERLAP_SECOND_CHUNK", False)
    assert head_dim_chunks(56) == (64, 0, 64)
    assert head_dim_chunks(72) == (128, 0, 128)
    assert head_dim_chunks(96) == (64, 32, 64)
    assert head_dim_chunks(80) == (64, 16, 64)
    for overlap in (False, True):
        monkeypatch.setattr(triton_attn, "OVERLAP_SECOND_CHUNK", overlap)
        for d in HEAD_DIMS:
            d0, d1, at = head_dim_chunks(d)
            pow2 = lambda x: x & (x - 1) == 0  # noqa: E731
            assert pow2(d0) and (d1 == 0 or (d1 >= 16 and pow2(d1))), d
            if d1 == 0:
                assert d0 >= d and at == d0, d  # one chunk, the columns past d masked
            else:
                assert at + d1 == d and at <= d0, d  # the second chunk ends at the last column, none masked
                assert at % 8 == 0, d  # starts on 16 bytes in 16-bit types (TMA boxes, vector loads)
                assert at == d0 or (overlap and d0 + d1 < d0 * 2), d  # overlaps only to save work
    assert head_dim_chunks(72) == (64, 16, 56)
    assert head_dim_chunks(56) == (64, 0, 64)  # 32 + 32 would be no less work than 64
    assert head_dim_chunks(136) == (128, 16, 120)


# (B, GH, GW, key window, H, D, dtype, mask at block 16: None or "empty-row")
POOLED = [
    (2, 16, 16, (8, 8), 2, 56, torch.float32, None),         # 4 windows, none overhanging
    (1, 12, 20, (8, 8), 2, 72, torch.float16, "empty-row"),   # overhang on both sides: 2 x 3 windows
    (1, 28, 28, (14, 14), 1, 96, torch.bfloat16, None),       # hiera stage 3 -> 4: 14 -> 7, 28 = 2 x 14
    (1, 8, 12, (4, 4), 2, 96, torch.float32, "empty-row"),    # stage 2 -> 3: 4 -> 2
]


def _pooled_mask(g, case):
    B, GH, GW, win, H = case[:5]
    if case[7] is None:
        return None
    n_win = -(-GH // win[0]) * -(-GW // win[1])
    qb, kb = -(-(win[0] * win[1] // 4) // 16), -(-(win[0] * win[1]) // 16)
    m = torch.rand(B * n_win, H, qb, kb, generator=g) < 0.6
    m[0, 0, 0] = False  # a query block of the first window attends to nothing: zeros
    return m


@pytest.mark.parametrize("case", POOLED, ids=lambda c: f"{c[1]}x{c[2]}w{c[3][0]}-D{c[5]}-{str(c[6])[6:]}")
def test_pooled_window_reference(case):
    seed, g = seeded()
    B, GH, GW, win, H, D, dtype, _ = case
    q, k, v, kp, vp = pooled_inputs(g, B, GH, GW, H, D, dtype)
    mask = _pooled_mask(g, case)
    qwin = (win[0] // 2, win[1] // 2)
    out = window_attn(q, k, v, win, mask, q_window_size=qwin, k_pad=kp, v_pad=vp, block_size=16)
    assert out.shape == q.shape
    check_window(out, q, k, v, win, kp, vp, mask, None, None, None, 16, seed, FLOOR, ROW_FLOOR, q_window=qwin)


@needs_triton
@pytest.mark.parametrize("case", POOLED, ids=lambda c: f"{c[1]}x{c[2]}w{c[3][0]}-D{c[5]}-{str(c[6])[6:]}")
def test_pooled_window_kernel(triton_kernel, case):
    check_pooled_windows(triton_kernel, case)


def check_pooled_windows(triton_kernel, case):
    seed, g = seeded()
    B, GH, GW, win, H, D, dtype, _ = case
    q, k, v, kp, vp = pooled_inputs(g, B, GH, GW, H, D, dtype)
    mask = _pooled_mask(g, case)
    qwin = (win[0] // 2, win[1] // 2)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    lists = block_lists(mask) if mask is not None else (None, None)
    triton_kernel.attention_triton(q, k, v, *lists, None, None, None, D ** -0.5, 16, window=win, q_window=qwin,
                                   k_pad=kp, v_pad=vp, out=out)
    check_window(out, q, k, v, win, kp, vp, mask, None, None, None, 16, seed, FLOOR, ROW_FLOOR, q_window=qwin)


@needs_triton
@pytest.mark.parametrize("case", [c for c in POOLED if c[5] == 72] + [(1, 20, 12, (8, 8), 3, 40, torch.bfloat16, None)],
                         ids=lambda c: f"{c[1]}x{c[2]}w{c[3][0]}-D{c[5]}-{str(c[6])[6:]}")
def test_overlapping_chunk_pooled_windows(overlap_kernel, case):
    """q-pooled windows that overhang the grid (their padding keys' k_pad . q and v_pad terms use the second
    chunk too) with the head dim's second chunk overlapping the first."""
    d0, d1, at = overlap_kernel.head_dim_chunks(case[5])
    assert d1 and at < d0, "this test is meant to run the overlapping chunk"
    check_pooled_windows(overlap_kernel, case)


@needs_triton
def test_pooled_window_through_the_public_api(triton_kernel):
    """window_attn with q_window_size on the kernel path: plan cache, layout, rel-pos terms on the query grid."""
    seed, g = seeded()
    q, k, v, kp, vp = pooled_inputs(g, 1, 12, 12, 2, 56, torch.float16)
    rh, rw = torch.randn(1, 2, 36, 8, generator=g).half() * 2, torch.randn(1, 2, 36, 8, generator=g).half() * 2
    mask = torch.rand(4, 2, 1, 4, generator=g) < 0.7
    layout = BlockLayout.from_mask(mask, 16)
    for _ in range(2):  # the second call takes the fast path
        out = window_attn(q, k, v, (8, 8), layout, q_window_size=(4, 4), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw,
                          softmax_scale=0.2)
        check_window(out, q, k, v, (8, 8), kp, vp, mask, rh, rw, 0.2, 16, seed, FLOOR, ROW_FLOOR, q_window=(4, 4))


@needs_triton
@pytest.mark.parametrize("grid,dtype", [((128, 96), torch.float16), ((64, 48), torch.bfloat16)])
def test_hiera_stage1_windows_kernel(triton_kernel, grid, dtype):
    """Stage 1 of hiera_t: 8 x 8 windows, one head of 96, the grid given as views of one qkv projection, on a
    128 x 96 grid (192 windows; the interpreter took a minute for 1024 px's 256 x 256, which
    tests/gpu/test_gpu_hiera.py runs compiled) and a 64 x 48 grid (48 windows) in bf16."""
    seed, g = seeded()
    q, k, v = torch.randn(1, *grid, 3, 1, 96, generator=g).to(dtype).unbind(3)
    zeros = torch.zeros(1, 96, dtype=dtype)
    out = window_attn(q, k, v, (8, 8))
    check_window(out, q, k, v, (8, 8), zeros, zeros, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR)


@needs_triton
@pytest.mark.parametrize("head_dim", HIERA_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_hiera_global_kernel(triton_kernel, head_dim, dtype):
    """A Hiera global block in small: a 16 x 12 grid (192 tokens, not a multiple of the 128-token block but
    of the 64-token tile), q, k, v strided views of one projection, a mask with an empty query block."""
    check_global_block(triton_kernel, head_dim, dtype)


@needs_triton
@pytest.mark.parametrize("head_dim,dtype", [(72, torch.float16), (72, torch.bfloat16), (72, torch.float32),
                                            (40, torch.bfloat16), (88, torch.float16), (136, torch.bfloat16)])
def test_overlapping_chunk_global(overlap_kernel, head_dim, dtype):
    """The same block with the head dim's second chunk overlapping the first: the shared columns must count
    once in q . k and be written once."""
    d0, d1, at = overlap_kernel.head_dim_chunks(head_dim)
    assert d1 and at < d0, "this test is meant to run the overlapping chunk"
    check_global_block(overlap_kernel, head_dim, dtype)


@needs_triton
def test_overlapping_chunk_varlen_gqa(overlap_kernel):
    """Three packed sequences (64 queries x 128 keys: a multiple of the 64-key tile, not of the 256-key mask
    block; 37 x 5; 100 x 300) at head dim 72 with the overlapping chunk, 4 heads on 2 kv heads, fp16."""
    seed, g = seeded()
    lq, lk = [64, 37, 100], [128, 5, 300]
    q, k, v, cu_q, cu_k = packed_inputs(g, lq, lk, 4, 2, 72, torch.float16)
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    overlap_kernel.attention_triton(q, k, v, None, None, None, None, None, 72 ** -0.5, 256, cu_seqlens_q=cu_q,
                                    cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk), out=out)
    check_varlen(out, q, k, v, cu_q, cu_k, None, 256, seed, FLOOR, ROW_FLOOR)


def check_global_block(triton_kernel, head_dim, dtype):
    seed, g = seeded()
    q, k, v = torch.randn(2, 192, 3, 2, head_dim, generator=g).to(dtype).unbind(2)
    mask = torch.rand(2, 2, 2, 2, generator=g) < 0.7
    mask[1, 1, 0] = False
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    triton_kernel.attention_triton(q, k, v, *block_lists(mask), None, None, None, head_dim ** -0.5, 128, out=out)
    ref = oracle_attention(q, k, v, mask, block_size=128)
    base = same_dtype_torch(q, k, v, mask, block_size=128)
    err, err_base = rel_error(out, ref), rel_error(base, ref)
    assert torch.isfinite(out).all(), f"seed {seed}: NaN or a row left unwritten"
    assert err <= 2 * err_base + FLOOR[dtype], f"seed {seed}: error {err:.3g} vs PyTorch {dtype} {err_base:.3g}"
    row_err = (out.double() - ref).abs().amax(-1)
    row_base = (base.double() - ref).abs().amax(-1)
    assert (row_err <= 2 * row_base + ROW_FLOOR[dtype]).all(), f"seed {seed}: rows off, worst {row_err.max():.3g}"
    assert (out[1, :128, 1] == 0).all(), f"seed {seed}: an empty query block must give zeros"


@needs_triton
@pytest.mark.parametrize("head_dim,overlap", [(56, False), (72, False), (40, False), (72, True), (40, True)])
def test_masked_head_dim_columns_are_never_read(triton_kernel, monkeypatch, head_dim, overlap):
    """Where the head dim is no sum of powers of two (56, 72 and 40 run as one masked chunk of 64, 128, 64),
    the kernel's chunk runs past it: q, k and v here are views of buffers whose columns past the head dim
    hold NaN, so a load that is not masked shows up as NaN in the output. With the overlapping second chunk
    (72 as 0-63 and 56-71) no column past the head dim is read at all."""
    monkeypatch.setattr(triton_kernel, "OVERLAP_SECOND_CHUNK", overlap)
    seed, g = seeded()
    width = 128
    bufs = [torch.full((1, 80, 2, width), float("nan"), dtype=torch.float16) for _ in range(3)]
    for b in bufs:
        b[..., :head_dim] = torch.randn(1, 80, 2, head_dim, generator=g).half()
    q, k, v = (b[..., :head_dim] for b in bufs)
    out = torch.full(q.shape, float("nan"), dtype=torch.float16)
    triton_kernel.attention_triton(q, k, v, None, None, None, None, None, head_dim ** -0.5, 32, out=out)
    ref = oracle_attention(q, k, v, block_size=32)
    assert torch.isfinite(out).all(), f"seed {seed}: a masked column was read (NaN in the output)"
    assert rel_error(out, ref) < 2e-3, f"seed {seed}"


@needs_triton
def test_sequence_head_pairs_beyond_one_grid_axis(triton_kernel, monkeypatch):
    """CUDA caps a grid's second axis at 65535, fewer than Hiera's windows x heads x batch (hiera_b+ stage 3
    at batch 8: 65536): the (sequence, head) pairs spill over to the third axis. Shrunk here to 5 so that
    the interpreter runs the spill (16 pairs on a 5 x 4 grid: 4 programs past the end return)."""
    monkeypatch.setattr(triton_kernel, "MAX_GRID_Y", 5)
    seed, g = seeded()
    q, k, v = torch.randn(2, 8, 8, 3, 2, 16, generator=g).unbind(3)
    zeros = torch.zeros(2, 16)
    plan = triton_kernel.make_plan(q, k, v, None, None, None, None, None, 0.25, 128, window=(4, 4))
    assert plan.grid[1:] == (5, 4)  # 2 images x 4 windows x 2 heads = 16 pairs
    out = plan(q, k, v, None, None, None, None, None, None, zeros, zeros,
               out=torch.full(q.shape, float("nan")))
    check_window(out, q, k, v, (4, 4), zeros, zeros, None, None, None, 0.25, 128, seed, FLOOR, ROW_FLOOR)


def test_pooled_window_bad_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v, kp, vp = pooled_inputs(g, 1, 12, 12, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=r"k has the token grid \(12, 12\) but q has \(6, 6\).*q_window_size"):
        window_attn(q, k, v, (4, 4))
    with pytest.raises(ValueError, match=r"q_window_size=\(4, 4\) cuts q's grid \(6, 6\) into \(2, 2\) windows, but "
                                         r"window_size=\(4, 4\) cuts k's grid \(12, 12\) into \(3, 3\)"):
        window_attn(q, k, v, (4, 4), q_window_size=(4, 4))
    with pytest.raises(ValueError, match=r"q_window_size=\(0, 2\): expected a pair"):
        window_attn(q, k, v, (4, 4), q_window_size=(0, 2))
    with pytest.raises(ValueError, match=r"block_mask with shape \(4, 2, 1, 1\); expected \(4 or 1, 2 or 1, 1, 4\)"):
        window_attn(q, k, v, (8, 8), torch.ones(4, 2, 1, 1, dtype=torch.bool), q_window_size=(4, 4), block_size=16)


# Packed windows (a config's PACK): (grid side, key window, query window or None, heads, head dim, dtype,
# (PACK, BLOCK_M, BLOCK_N)). One key step and several; packed programs of several query tiles (16-row tiles of 4
# windows of 16); the overlapping chunk (72), the masked one (56).
PACKED = [
    (16, 4, None, 2, 72, torch.float16, (4, 64, 64)),
    (16, 4, None, 1, 56, torch.bfloat16, (2, 32, 16)),
    (16, 8, 4, 2, 96, torch.float32, (2, 32, 32)),
    (16, 4, 2, 2, 40, torch.float16, (4, 16, 16)),
    (32, 2, None, 1, 64, torch.float32, (16, 64, 64)),
    (16, 4, None, 2, 32, torch.float16, (4, 16, 16)),  # 64 queries per packed program, 16-row tiles: 4 query tiles
]


@needs_triton
@pytest.mark.parametrize("case", PACKED, ids=lambda c: f"{c[0]}w{c[1]}q{c[2]}-D{c[4]}-{str(c[5])[6:]}-p{c[6][0]}")
def test_packed_windows_kernel(overlap_kernel, case):
    """Several windows per program, block-diagonal: every query sees its own window's keys only, into a
    NaN-poisoned output, against the float64 oracle per row."""
    side, w, qw, heads, d, dtype, (pack, bm, bn) = case
    seed, g = seeded()
    q, k, v = torch.randn(2, side, side, 3, heads, d, generator=g).to(dtype).unbind(3)
    if qw is not None:
        q = q.unflatten(1, (side // 2, 2)).unflatten(3, (side // 2, 2)).amax(dim=(2, 4))
    q_win = None if qw is None else (qw, qw)
    zeros = torch.zeros(heads, d, dtype=dtype)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    overlap_kernel.attention_triton(q, k, v, None, None, None, None, None, d ** -0.5, 128, window=(w, w),
                                    q_window=q_win, k_pad=zeros, v_pad=zeros, out=out,
                                    config=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2, PACK=pack))
    check_window(out, q, k, v, (w, w), zeros, zeros, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR,
                 q_window=q_win)


def test_packed_windows_refused_where_they_do_not_apply():
    """PACK needs windows that tile the grid exactly, no block mask, no rel-pos terms, and a divisor of the
    windows per grid row: anything else is a clear error, before any launch."""
    from sam_sparse.kernels import triton_attn

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 16, 12, 3, 1, 16, generator=g).unbind(3)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, PACK=4)
    with pytest.raises(ValueError, match=r"PACK=4 needs .* dividing the windows per grid row \(3\)"):
        triton_attn.make_plan(q, k, v, None, None, None, None, None, 0.25, 128, window=(4, 4), config=cfg)
    q, k, v = torch.randn(1, 14, 16, 3, 1, 16, generator=g).unbind(3)  # windows overhang the grid: padding keys
    with pytest.raises(ValueError, match=r"on a grid the windows tile exactly"):
        triton_attn.make_plan(q, k, v, None, None, None, None, None, 0.25, 128, window=(4, 4), config=cfg)
    q, k, v = torch.randn(1, 16, 16, 3, 1, 16, generator=g).unbind(3)
    mask = block_lists(torch.ones(16, 1, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"without a block mask or rel-pos terms"):
        triton_attn.make_plan(q, k, v, *mask, None, None, None, 0.25, 128, window=(4, 4), config=cfg)
    with pytest.raises(ValueError, match=r"PACK=1.5"):
        triton_attn.make_plan(q, k, v, None, None, None, None, None, 0.25, 128, window=(4, 4), config={**cfg, "PACK": 1.5})


def test_packed_window_candidates(monkeypatch):
    """Windows of at most 32 queries (a power of two) that tile their grid without a mask or rel-pos terms get one
    candidate, 64 rows of packed windows (run 110: it beat every other tile there); none elsewhere, where PACK
    would not divide a grid row's windows, or with PACK_WINDOWS off."""
    from sam_sparse.kernels import triton_attn

    base = dict(seqlen_q=16, seqlen_k=16, WIN_HW=(4, 4), PACK_COLS=32, MASK_BLOCK=128, IS_FP32=False, D0=64, D1=16,
                DV=80)
    one = lambda a: [(c["PACK"], c["BLOCK_M"], c["BLOCK_N"], c.get("TMA", 0)) for c in triton_attn._pack_configs(a)]  # noqa: E731
    assert one(base) == [(4, 64, 64, 0)]
    assert one({**base, "seqlen_k": 64, "WIN_HW": (8, 8)}) == [(4, 64, 64, 0)]  # the pooled block into stage 2
    assert one({**base, "seqlen_q": 4, "WIN_HW": (4, 4)}) == [(16, 64, 64, 0)]  # the pooled block into stage 3
    assert one({**base, "PACK_COLS": 0}) == []
    assert one({**base, "PACK_COLS": 6}) == []
    assert one({**base, "seqlen_q": 64, "seqlen_k": 64, "WIN_HW": (8, 8)}) == []
    assert one({**base, "seqlen_q": 49, "seqlen_k": 49, "WIN_HW": (7, 7)}) == []
    # Never timed, so only where it fits and was measured: 16 bits, head dims up to 128, key tiles of 16 or more.
    assert one({**base, "IS_FP32": True}) == []
    assert one({**base, "D0": 128, "D1": 16, "DV": 144}) == []
    assert one({**base, "seqlen_k": 9, "WIN_HW": (3, 3)}) == []  # keys no power of two
    assert one({**base, "seqlen_k": 1, "WIN_HW": (1, 1)}) == []  # 4 packed keys: no tile
    # Tiles divide the block size: 16 rows of 4 pooled 2 x 2 windows at block size 16, none for windows of 16.
    assert one({**base, "seqlen_q": 4, "MASK_BLOCK": 16}) == [(4, 16, 16, 0)]
    assert one({**base, "MASK_BLOCK": 16}) == []
    assert one({**base, "MASK_BLOCK": 32}) == [(2, 32, 32, 0)]
    monkeypatch.setattr(triton_attn, "PACK_WINDOWS", False)
    assert one(base) == []


@needs_triton
def test_tuned_packed_plans_fit_their_block_size(triton_kernel, monkeypatch):
    """Every block size a window call may bring (16-128) gets a launch whose tiles divide it, packed or not: the
    tuner's candidates go through _check_config (a packed 64-row tile at block size 16 failed on the GPU, run 112).
    The tuner is asked as on a GPU (timed), with the timing stubbed: candidates[0] wins."""
    from sam_sparse.kernels import triton_attn

    monkeypatch.setattr(triton_attn, "_TUNED", {})
    picked = []
    monkeypatch.setattr(triton_attn, "_tune", lambda key, cands, *a, **kw: picked.append(cands) or cands[0])
    monkeypatch.setattr(triton_attn, "INTERPRET", False)
    monkeypatch.delenv("SAM_SPARSE_AUTOTUNE", raising=False)
    g = torch.Generator().manual_seed(0)
    packs = set()
    for side, w, qw in ((16, 8, 4), (16, 4, 2), (16, 4, None), (4, 1, 4)):
        q, k, v = torch.randn(1, side, side, 3, 2, 16, generator=g).half().unbind(3)  # packing is for 16 bits
        if qw is not None and qw < w:
            q = q[:, ::2, ::2]
        if qw is not None and qw > w:  # query windows larger than the key windows: 4 x 4 queries per key
            q = torch.randn(1, side * qw, side * qw, 2, 16, generator=g).half()
        for bs in (16, 32, 64, 128):
            triton_attn.make_plan(q, k, v, None, None, None, None, None, 0.25, bs, window=(w, w),
                                  q_window=None if qw is None else (qw, qw))
            for c in picked.pop():
                triton_attn._check_config(c, bs)
                packs.add((side, w, qw, bs, c.get("PACK", 1)))
    assert {(16, 4, 2, 16, 4), (16, 8, 4, 32, 2), (16, 4, None, 64, 4)} <= packs, packs  # packed where it applies
    assert all(p == 1 for (side, w, qw, bs, p) in packs if qw == 4 and w == 1), packs


# Cropped windows (the kernel's CROP): the launch of windows that overhang the grid, without a block mask or rel-pos
# terms, takes each window's tokens on the grid in raster order of the cropped rectangle and its padding keys as one
# key of weight n_pad. (B, GH, GW, key window, q pooled by 2, heads, head dim, dtype, (BLOCK_M, BLOCK_N)): windows
# that overhang to the right only, below only, both, a grid smaller than one window, Hiera's 14 x 14 (cropped to
# 6 and 4 tokens wide), q-pooled ones, heads sharing kv heads ((H, kv heads)); tiles small enough that a cropped
# window still takes several query tiles and key steps, so its counts fall inside tiles.
CROPPED = [
    (2, 8, 11, (4, 4), False, 2, 56, torch.float32, (16, 16)),      # right only: 3 columns on the grid
    (1, 11, 8, (4, 4), False, 2, 24, torch.float16, (16, 16)),      # below only
    (1, 10, 11, (4, 4), False, 1, 16, torch.bfloat16, (16, 16)),    # both, and the corner
    (2, 3, 5, (4, 8), False, 2, 32, torch.float32, (16, 16)),       # a grid smaller than one window: 15 of 32 keys
    (1, 20, 18, (14, 14), False, 1, 40, torch.bfloat16, (32, 16)),  # Hiera's 14: cropped to 6 x 14, 14 x 4, 6 x 4
    (1, 20, 12, (8, 8), True, 2, 72, torch.float16, (16, 16)),      # q pooled: 4 x 4 query windows cropped to 2 wide
    (1, 36, 36, (14, 14), True, 1, 56, torch.bfloat16, (16, 32)),   # stage 3 -> 4: keys 8 wide, queries 4 wide
    (1, 10, 13, (4, 4), False, (4, 2), 40, torch.float16, (16, 16)),  # 4 heads on 2 kv heads: k_pad per kv head
]


@needs_triton
@pytest.mark.parametrize("crop", [True, False], ids=["cropped", "padded"])
@pytest.mark.parametrize("case", CROPPED, ids=lambda c: f"{c[1]}x{c[2]}w{c[3][0]}x{c[3][1]}{'p' if c[4] else ''}-D{c[6]}")
def test_cropped_windows_kernel(overlap_kernel, monkeypatch, case, crop):
    """Windows that overhang the grid, cropped (CROP_WINDOWS, the default) and padded, into a NaN-poisoned output
    against the float64 oracle per row, with random padding keys and values (a projection's bias) that weigh in."""
    B, GH, GW, win, pooled, H, D, dtype, (bm, bn) = case
    monkeypatch.setattr(overlap_kernel, "CROP_WINDOWS", crop)
    seed, g = seeded()
    if pooled:
        q, k, v, kp, vp = pooled_inputs(g, B, GH, GW, H, D, dtype)
    else:
        H, Hk = H if isinstance(H, tuple) else (H, H)
        q = torch.randn(B, GH, GW, H, D, generator=g).to(dtype)
        k, v = torch.randn(B, GH, GW, 2, Hk, D, generator=g).to(dtype).unbind(3)
        kp, vp = (torch.randn(Hk, D, generator=g).to(dtype) for _ in range(2))
    q_win = (win[0] // 2, win[1] // 2) if pooled else None
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    overlap_kernel.attention_triton(q, k, v, None, None, None, None, None, D ** -0.5, 128, window=win, q_window=q_win,
                                    k_pad=kp, v_pad=vp, out=out,
                                    config=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2))
    check_window(out, q, k, v, win, kp, vp, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR, q_window=q_win)


@needs_triton
@pytest.mark.parametrize("crop", [True, False], ids=["cropped", "padded"])
def test_cropped_window_padding_key_near_the_cut(triton_kernel, monkeypatch, crop):
    """A live row whose padding keys' logits lie just below the cut (-1e38 * scale) weighs them as the padded path
    and the oracle do (exp of their distance to the row's max), not as 0: at softmax_scale 1e-36 the corner query's
    real logits are -97, its padding keys' -104, the cut -100."""
    monkeypatch.setattr(triton_kernel, "CROP_WINDOWS", crop)
    seed, g = seeded()
    q, k, v = (torch.randn(1, 6, 7, 1, 16, generator=g) for _ in range(3))
    kp, vp = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    q[..., 0] = 0.0
    k[..., 0], kp[:, 0] = -0.97e19, -1.04e19
    q[0, 5, 6, 0] = 0.0
    q[0, 5, 6, 0, 0] = 1e19  # the corner query: q . k = -0.97e38, q . k_pad = -1.04e38
    out = torch.full(q.shape, float("nan"))
    triton_kernel.attention_triton(q, k, v, None, None, None, None, None, 1e-36, 128, window=(4, 4), k_pad=kp, v_pad=vp,
                                   out=out, config=dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2))
    ref = check_window(out, q, k, v, (4, 4), kp, vp, None, None, None, 1e-36, 128, seed, FLOOR, ROW_FLOOR)
    real = v[0, 4:6, 4:7, 0].reshape(6, 16).double().mean(0)  # its 6 keys on the grid alone, all at the same logit
    assert (ref[0, 5, 6, 0] - real).abs().max() > 1e-4, f"seed {seed}: the case must give the padding keys weight"


def plan_constexprs(triton_kernel, plan) -> dict:
    """A KernelPlan's arguments after the tensors, by the kernel's parameter names."""
    fn = getattr(triton_kernel._attn_fwd, "fn", triton_kernel._attn_fwd)  # interpreter: the Python function
    names = list(inspect.signature(fn).parameters)[triton_kernel._N_TENSORS:]
    return dict(zip(names, plan._tail, strict=True))


@needs_triton
def test_cropping_and_key_tail_apply_where_they_should(triton_kernel):
    """Which launches crop their windows and which take a narrow key tail: a 14 x 14 window's plan crops the
    overhanging windows (no key tail there: their key counts vary) and gives the inside ones a 16-key tail with full
    unmasked steps; a block mask or rel-pos terms keep both off; sequences, fp32 and head dims past 128 never take
    the tail; windows that end on a step need none."""
    g = torch.Generator().manual_seed(0)
    cfg = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    want = ("WIN_PAD", "CROP", "TAIL_N", "EVEN_N", "TMA")

    def launches(q, k, v, window, lists=(None, None), rel=(None, None), **kw):
        plan = triton_kernel.make_plan(q, k, v, *lists, *rel, None, 0.25, 128, window=window, config=cfg, **kw)
        return [tuple(plan_constexprs(triton_kernel, p)[n] for n in want) for p in getattr(plan, "plans", [plan])]

    q, k, v = torch.randn(1, 64, 64, 3, 2, 56, generator=g).half().unbind(3)
    assert launches(q, k, v, (14, 14)) == [(False, False, 16, True, False), (True, True, 0, False, False)]
    qp = q.unflatten(1, (32, 2)).unflatten(3, (32, 2)).amax(dim=(2, 4))
    assert launches(qp, k, v, (14, 14), q_window=(7, 7)) == [(False, False, 16, True, False), (True, True, 0, False, False)]
    rel = torch.randn(1, 2, 4096, 14, generator=g).half(), torch.randn(1, 2, 4096, 14, generator=g).half()
    assert [c[1:3] for c in launches(q, k, v, (14, 14), rel=rel)] == [(False, 0), (False, 0)]
    lists = block_lists(torch.ones(25, 2, 2, 2, dtype=torch.bool))
    assert [c[1:3] for c in launches(q, k, v, (14, 14), lists=lists)] == [(False, 0), (False, 0)]
    assert [c[2] for c in launches(*(t.float() for t in (q, k, v)), (14, 14))] == [0, 0]  # fp32
    q2, k2, v2 = torch.randn(1, 28, 28, 3, 1, 256, generator=g).half().unbind(3)
    assert [c[2] for c in launches(q2, k2, v2, (14, 14))] == [0]  # head dim 256
    assert launches(q, k, v, (16, 16)) == [(False, False, 0, True, False)]  # 256 keys: four full steps
    qs, ks, vs = torch.randn(1, 100, 3, 2, 56, generator=g).half().unbind(2)
    plan = triton_kernel.make_plan(qs, ks, vs, None, None, None, None, None, 0.25, 128, config=cfg)
    assert plan_constexprs(triton_kernel, plan)["TAIL_N"] == 0  # a sequence: its length varies inside its class


# Narrow last key tiles (the kernel's TAIL_N): a window's keys that end in a partial step take it after the loop as a
# narrower tile, loaded before the loop. ((B, GH, GW, window, q pooled), head dim, dtype, (BLOCK_M, BLOCK_N)): 196 keys
# as 3 x 64 + 16 and 6 x 32 + 16, 35 as 32 + 16, 66 as 64 + 16 (2 of them keys), q-pooled 14 x 14 windows, windows
# inside a grid beside cropped ones, two head-dim chunks (the overlapping one at 24, 40 and 72).
TAILED = [
    ((1, 28, 28, (14, 14), False), 16, torch.float16, (64, 64)),
    ((2, 28, 14, (14, 14), False), 40, torch.bfloat16, (32, 32)),
    ((1, 10, 14, (5, 7), False), 24, torch.float16, (16, 32)),
    ((1, 30, 30, (14, 14), False), 32, torch.float16, (64, 64)),   # 4 inside (tail), 5 cropped
    ((1, 28, 28, (14, 14), True), 72, torch.bfloat16, (16, 64)),   # q 7 x 7 windows on 14 x 14
    ((1, 12, 25, (6, 11), False), 24, torch.bfloat16, (16, 64)),   # 66 keys: 64 + 2, cropped windows beside
]


@needs_triton
@pytest.mark.parametrize("tail", [True, False], ids=["tail", "masked-step"])
@pytest.mark.parametrize("case", TAILED, ids=lambda c: f"{c[0][1]}x{c[0][2]}w{c[0][3][0]}x{c[0][3][1]}-D{c[1]}-{c[3][1]}")
def test_narrow_last_key_tile_kernel(overlap_kernel, monkeypatch, case, tail):
    """A window's keys that end in a partial step, through the narrow tail tile (TAIL_KEYS, the default) and through
    a masked full step, into a NaN-poisoned output, against the float64 oracle per row."""
    (B, GH, GW, win, pooled), D, dtype, (bm, bn) = case
    monkeypatch.setattr(overlap_kernel, "TAIL_KEYS", tail)
    seed, g = seeded()
    if pooled:
        q, k, v, kp, vp = pooled_inputs(g, B, GH, GW, 2, D, dtype)
    else:
        q, k, v = torch.randn(B, GH, GW, 3, 2, D, generator=g).to(dtype).unbind(3)
        kp, vp = (torch.randn(2, D, generator=g).to(dtype) for _ in range(2))
    q_win = (win[0] // 2, win[1] // 2) if pooled else None
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    overlap_kernel.attention_triton(q, k, v, None, None, None, None, None, D ** -0.5, 128, window=win, q_window=q_win,
                                    k_pad=kp, v_pad=vp, out=out, config=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
                                                                             num_stages=2))
    check_window(out, q, k, v, win, kp, vp, None, None, None, None, 128, seed, FLOOR, ROW_FLOOR, q_window=q_win)


def test_narrow_last_key_tile_widths():
    """The tail tile is the power of two >= 16 above the keys past the last full step, where it is narrower than
    a step; none where the keys end on a step."""
    from sam_sparse.kernels.triton_attn import _tail_keys

    assert [_tail_keys(n, 64) for n in (196, 192, 256, 49, 100, 212, 35)] == [16, 0, 0, 0, 0, 32, 0]
    assert [_tail_keys(n, 32) for n in (196, 35, 50, 64)] == [16, 16, 0, 0]
