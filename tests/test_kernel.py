"""Block-sparse attention: the Triton kernel (in Triton's interpreter) and the CPU reference path,
both against an independent float64 oracle (tests/oracle.py), on fresh random inputs every case.

Rule (flash-attn's): error <= 2x the error of the same computation done by PyTorch in the same dtype,
plus a small floor; never NaN. The kernel writes into an output poisoned with NaN first.
"""

import itertools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import oracle_attention, rel_error, same_dtype_torch
from sam_sparse import block_sparse_attn, block_sparse_attn_varlen
from sam_sparse.bench import reset_dynamo
from sam_sparse.kernels import BlockLayout, block_lists
from sam_sparse.kernels.interface import HAS_TRITON  # platforms without Triton: the PyTorch path still serves

FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")


def make_inputs(g, B, Nq, Nk, H, Hk, D, dtype, rel=None, noncontig=False, rel_transposed=False):
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if noncontig:  # q, k, v as strided views of one fused projection, as SAM's qkv gives them
        assert Nq == Nk
        qkv = rnd(B, Nq, 3, H, D)
        q, k, v = qkv.unbind(2)
        k, v = k[:, :, :Hk], v[:, :, :Hk]
    else:
        q, k, v = rnd(B, Nq, H, D), rnd(B, Nk, Hk, D), rnd(B, Nk, Hk, D)
    rel_h = rel_w = None
    if rel is not None:
        # SAM zero-initializes rel_pos: random, sizeable terms make the bias matter in every test
        rel_h, rel_w = rnd(B, H, Nq, rel[0]) * 2, rnd(B, H, Nq, rel[1]) * 2
        if rel_transposed:
            rel_h = rel_h.transpose(-1, -2).contiguous().transpose(-1, -2)
            rel_w = rel_w.transpose(-1, -2).contiguous().transpose(-1, -2)
    return q, k, v, rel_h, rel_w


def random_mask(g, B, H, Nq, Nk, bs, density, empty_block=True):
    qb, kb = -(-Nq // bs), -(-Nk // bs)
    m = torch.rand(B, H, qb, kb, generator=g) < density
    if empty_block:
        m[0, 0, 0] = False  # a query block with no key block at all
    return m


def check(out, q, k, v, mask, rel_h, rel_w, tile, bs, scale=None):
    assert torch.isfinite(out).all(), "NaN/inf in the output (or a row left unwritten)"
    ref = oracle_attention(q, k, v, mask, rel_h, rel_w, tile, scale=scale, block_size=bs)
    base = same_dtype_torch(q, k, v, mask, rel_h, rel_w, tile, scale=scale, block_size=bs)
    err, err_base = rel_error(out, ref), rel_error(base, ref)
    assert err <= 2 * err_base + FLOOR[q.dtype], f"error {err:.3g} vs PyTorch {q.dtype} {err_base:.3g}"
    if mask is not None:
        empty = ~mask.any(-1)  # (B|1, H|1, QB)
        for b, h, m in empty.nonzero().tolist():
            rows = out[b, m * bs : (m + 1) * bs, h]
            assert (rows == 0).all(), "a query block with no key block must give zeros"


# ------------------------------------------------------------------------------------------------
# The Triton kernel itself, in the interpreter
# ------------------------------------------------------------------------------------------------

def run_kernel(triton_attn, q, k, v, mask, rel_h, rel_w, tile, bs, config=None, scale=None):
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lists = block_lists(mask) if mask is not None else (None, None)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    triton_attn.attention_triton(q, k, v, *lists, rel_h, rel_w, tile, scale, bs, out=out, config=config)
    return out


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 24, 32, 48, 56, 64, 72, 80, 96, 112, 128, 176, 256])
def test_kernel_head_dims_and_dtypes(triton_kernel, dtype, head_dim):
    g = torch.Generator().manual_seed(torch.seed())
    q, k, v, _, _ = make_inputs(g, 2, 100, 70, 2, 1, head_dim, dtype)
    mask = random_mask(g, 2, 2, 100, 70, 32, 0.6)
    out = run_kernel(triton_kernel, q, k, v, mask, None, None, None, 32)
    check(out, q, k, v, mask, None, None, None, 32)


# (rel grid, key tile, config): each bias path of the kernel.
BIAS_CASES = [
    ((4, 64), None, dict(BLOCK_M=32, BLOCK_N=64)),    # one grid row per key tile, rel_w hoisted
    ((4, 64), None, dict(BLOCK_M=32, BLOCK_N=64, W_DOT=1)),  # ... rel_w added by rel_w @ I (not fp32)
    ((4, 64), None, dict(BLOCK_M=32, BLOCK_N=32)),    # one row, half a row per tile
    ((8, 32), None, dict(BLOCK_M=32, BLOCK_N=64)),    # two rows per key tile (rectangle)
    ((16, 16), (4, 16), dict(BLOCK_M=32, BLOCK_N=64)),  # tiled keys, 4 x 16 rectangles
    ((16, 16), (8, 8), dict(BLOCK_M=16, BLOCK_N=32)),   # sub-rectangles of 8 x 8 tiles
    ((14, 14), None, dict(BLOCK_M=32, BLOCK_N=64)),   # SAM's window: one-hot path, partial last block
    ((3, 85), None, dict(BLOCK_M=32, BLOCK_N=32)),    # odd grid too wide for one-hot: gather path
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rel,tile,config", BIAS_CASES)
def test_kernel_relpos_paths(triton_kernel, dtype, rel, tile, config):
    g = torch.Generator().manual_seed(torch.seed())
    n = rel[0] * rel[1]
    q, k, v, rh, rw = make_inputs(g, 1, n, n, 2, 2, 64, dtype, rel=rel, noncontig=True)
    mask = random_mask(g, 1, 2, n, n, 64, 0.7)
    cfg = dict(config, num_warps=4, num_stages=2)
    out = run_kernel(triton_kernel, q, k, v, mask, rh, rw, tile, 64, config=cfg)
    check(out, q, k, v, mask, rh, rw, tile, 64)


@needs_triton
def test_autotune_space_is_pruned_to_the_problem(triton_kernel):
    """SAM's global layer keeps 64/128 tiles, the rel_w @ I variant only where it changes the code, and the
    TMA variants only where the inputs can be read through TMA (make_plan's TMA_OK: Hopper, aligned)."""
    base = dict(seqlen_q=4096, seqlen_k=4096, MASK_BLOCK=128, D0=64, D1=0, DV=64, HAS_BIAS=True, IS_FP32=False,
                IS_BF16=True, KH=64, KW=64, tile_w=64, TMA_OK=False, WINDOW=False)
    kept = triton_kernel._prune(triton_kernel._configs(), base)
    shapes = {(c["BLOCK_M"], c["BLOCK_N"], c["W_DOT"]) for c in kept}
    assert {bm for bm, _, _ in shapes} == {64, 128} and {bn for _, bn, _ in shapes} == {64, 128}
    assert {(bm, bn) for bm, bn, w in shapes if w} == {(64, 64), (128, 64)}
    for changed in (dict(IS_FP32=True, IS_BF16=False), dict(IS_BF16=False), dict(HAS_BIAS=False), dict(tile_w=16)):
        assert not any(c["W_DOT"] for c in triton_kernel._prune(triton_kernel._configs(), {**base, **changed}))
    decoder = triton_kernel._prune(triton_kernel._configs(), {**base, "seqlen_q": 7, "HAS_BIAS": False})
    assert {c["BLOCK_M"] for c in decoder} == {16}
    assert not any(c.get("TMA") for c in kept)
    hopper = triton_kernel._prune(triton_kernel._configs(), {**base, "TMA_OK": True})
    assert {(c["BLOCK_M"], c["num_warps"]) for c in hopper if c.get("TMA")} == {(128, 8), (64, 4)}
    short = {**base, "seqlen_q": 7, "HAS_BIAS": False, "TMA_OK": True}  # decoder tokens: no 64-row tiles at all
    assert not any(c.get("TMA") for c in triton_kernel._prune(triton_kernel._configs(), short))


@needs_triton
def test_autotune_space_drops_twins(triton_kernel):
    """Each config the tuner compiles costs a patched model's first call about half a second (run 64): none
    that twins another is kept. Hiera's windows (no bias) keep no 128-row or 128-key tile; a key loop of one or
    two steps keeps 3 stages and not its 2-stage twin, and on Hopper a dense 16-bit window's loop of three or more
    (through TMA, or at a width that is no power of two) the reverse; where K / V can go through TMA, no pointer-load config
    stays at head dims up to 128 (TMA won at every such shape measured) and at head dim 256 only the
    pointer-load twin of a TMA config goes. Every shape still keeps a config."""
    hiera = dict(seqlen_q=64, seqlen_k=64, MASK_BLOCK=128, D0=64, D1=16, D1_AT=56, DV=80, HAS_BIAS=False, IS_FP32=False,
                 IS_BF16=True, KH=1, KW=1, tile_w=1, TMA_OK=False, WINDOW=True, WIN_HW=(8, 8))
    prune = lambda **kw: triton_kernel._prune(triton_kernel._configs(), {**hiera, **kw})  # noqa: E731
    keys = lambda cs: {(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], c.get("TMA", 0)) for c in cs}  # noqa: E731
    assert keys(prune()) == {(64, 64, 3, 0)}  # 8 x 8 windows: one key step
    assert keys(prune(seqlen_q=256, seqlen_k=256)) == {(64, 64, 2, 0), (64, 64, 3, 0)}
    assert keys(prune(seqlen_q=64, seqlen_k=256)) == {(64, 64, 2, 0), (64, 64, 3, 0)}  # a q-pooled block
    assert any(c["BLOCK_N"] == 128 for c in prune(seqlen_q=256, seqlen_k=256, WINDOW=False))
    assert any(c["BLOCK_M"] == 128 for c in prune(seqlen_q=256, seqlen_k=256, WINDOW=False))
    assert any(c["BLOCK_M"] == 128 for c in prune(seqlen_q=256, seqlen_k=256, HAS_BIAS=True, KH=14, KW=14, tile_w=14))
    # Where K / V can go through TMA (head dims up to 128), only the TMA configs: they won wherever both ran.
    assert keys(prune(seqlen_q=4096, seqlen_k=4096, WINDOW=False, TMA_OK=True)) == {(128, 64, 3, 1), (64, 64, 3, 1)}
    sam_global = dict(seqlen_q=4096, seqlen_k=4096, WINDOW=False, TMA_OK=True, HAS_BIAS=True, KH=64, KW=64, tile_w=64,
                      D0=64, D1=16, D1_AT=64)
    assert keys(prune(**sam_global)) == {(128, 64, 3, 1), (64, 64, 3, 1)}
    assert {(128, 64, 3, 0), (64, 64, 3, 0)} <= keys(prune(seqlen_q=4096, seqlen_k=4096, WINDOW=False))
    memory = keys(prune(seqlen_q=4096, seqlen_k=32768, WINDOW=False, TMA_OK=True, D0=256, D1=0, D1_AT=256))
    assert (128, 64, 2, 1) in memory and any(not t for *_, t in memory), "head dim 256 keeps its pointer-load tiles"
    assert keys(prune(seqlen_q=4096, seqlen_k=7, WINDOW=False, TMA_OK=True)), "no TMA tile fits 7 keys: others stay"
    # Windows: TMA in place of pointer loads where a 64-key tile is whole rows of the window and the window takes
    # several key steps (run 84), at 2 stages only from three steps on; pointer loads for one-step windows and widths
    # that are no power of two; the windows-only 2-stage TMA config never for sequences.
    assert keys(prune(seqlen_q=256, seqlen_k=256, TMA_OK=True, WIN_HW=(16, 16))) == {(64, 64, 2, 1)}
    assert keys(prune(seqlen_q=64, seqlen_k=256, TMA_OK=True, WIN_HW=(16, 16))) == {(64, 64, 2, 1)}
    assert keys(prune(TMA_OK=True)) == {(64, 64, 3, 0)}  # 8 x 8 windows: one key step
    assert keys(prune(seqlen_q=196, seqlen_k=196, TMA_OK=True, WIN_HW=(14, 14))) == {(64, 64, 2, 0)}
    # ... where that was measured only: dense, bias-free 16-bit windows; SAM's windows with rel-pos, sparse ones
    # (their loops may be shorter) and fp32 keep both.
    stages = lambda **kw: {st for bm, bn, st, _ in keys(prune(seqlen_q=196, seqlen_k=196, TMA_OK=True,  # noqa: E731
                                                            WIN_HW=(14, 14), **kw)) if (bm, bn) == (64, 64)}
    assert stages(HAS_BIAS=True, KH=14, KW=14, tile_w=14) == {2, 3}
    assert stages(HAS_MASK=True) == {2, 3}
    assert stages(IS_FP32=True, IS_BF16=False) == {2, 3}
    assert keys(prune(seqlen_q=256, seqlen_k=128, TMA_OK=True, WIN_HW=(16, 8))) == {(64, 64, 3, 1)}  # two steps
    assert not any(c.get("WINDOWS_ONLY") for c in prune(seqlen_q=4096, seqlen_k=4096, WINDOW=False, TMA_OK=True))
    for sq, sk in ((1, 1), (7, 4096), (4096, 7), (16, 16), (300, 20)):
        assert prune(seqlen_q=sq, seqlen_k=sk), (sq, sk)


@needs_triton
def test_host_scale_launches_keep_pointer_loads_and_their_own_class(triton_kernel):
    """A launch small enough for the host to be what the GPU waits for (HOST_SCALE_WORK) keeps the pointer-load
    twins of its TMA tiles, which launch in a third of the host time; any other keeps TMA only. hiera_l's 16 x 16
    windows (and its stage-1 8 x 8 ones) are host-scale at batch 1 and not at batch 8; its global blocks at
    neither; the decoder's few-token sides always are (their class must not depend on the prompt count), and a
    window's few tokens do not count as such."""
    window = dict(seqlen_q=256, seqlen_k=256, MASK_BLOCK=128, D0=64, D1=16, D1_AT=56, DV=80, HAS_BIAS=False,
                  IS_FP32=False, IS_BF16=True, KH=1, KW=1, tile_w=1, TMA_OK=True, WINDOW=True, WIN_HW=(16, 16))
    keys = lambda **kw: {(c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], c.get("TMA", 0))  # noqa: E731
                         for c in triton_kernel._prune(triton_kernel._configs(), {**window, **kw})}
    assert keys() == {(64, 64, 2, 1)}
    assert keys(HOST_SCALE=True) == {(64, 64, 2, 1), (64, 64, 3, 1), (64, 64, 2, 0), (64, 64, 3, 0)}
    glob = dict(seqlen_q=4096, seqlen_k=4096, WINDOW=False)
    assert all(t for *_, t in keys(**glob)) and not all(t for *_, t in keys(HOST_SCALE=True, **glob))
    scale = triton_kernel.host_scale
    assert scale(1 * 16 * 8, 256, 256, 80, 80, True) and not scale(8 * 16 * 8, 256, 256, 80, 80, True)  # 16 x 16
    assert scale(1024 * 2, 64, 64, 80, 80, True) and not scale(8 * 1024 * 2, 64, 64, 80, 80, True)  # 8 x 8 windows
    assert not scale(8, 4096, 4096, 80, 80)  # a global block at batch 1
    assert scale(1, 4096, 8, 16, 16) and scale(4096, 8, 4096, 16, 16)  # the decoder's sides, any prompt count


@needs_triton
def test_a_single_candidate_is_not_timed(triton_kernel, monkeypatch):
    """A shape class with one candidate takes it without timing it (and writes nothing to the disk cache)."""
    monkeypatch.setattr(triton_kernel, "_TUNED", {})
    cfg = dict(BLOCK_M=64, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=3)

    def bench(c):
        raise AssertionError("timed a lone candidate")

    assert triton_kernel._tune(("lone",), [cfg], bench, torch.device("cpu")) is cfg
    assert triton_kernel._TUNED[("lone",)] is cfg


@needs_triton
@pytest.mark.parametrize("mode", [2, 3])
def test_kernel_forced_bias_modes(triton_kernel, monkeypatch, mode):
    """The one-hot and gather paths also handle shapes where autotuning would pick the rectangle."""
    monkeypatch.setattr(triton_kernel, "FORCE_BIAS_PATH", mode)
    g = torch.Generator().manual_seed(torch.seed())
    q, k, v, rh, rw = make_inputs(g, 1, 256, 256, 2, 2, 32, torch.float16, rel=(16, 16), rel_transposed=True)
    out = run_kernel(triton_kernel, q, k, v, None, rh, rw, (4, 8), 64)
    check(out, q, k, v, None, rh, rw, (4, 8), 64)


@needs_triton
def test_kernel_decoder_shapes_and_gqa(triton_kernel):
    """SAM's decoder: a handful of tokens against 4096 image tokens, and the reverse; MQA heads."""
    g = torch.Generator().manual_seed(torch.seed())
    for nq, nk in ((7, 1024), (1024, 7)):
        q, k, v, _, _ = make_inputs(g, 2, nq, nk, 4, 1, 16, torch.float16)
        out = run_kernel(triton_kernel, q, k, v, None, None, None, None, 128)
        check(out, q, k, v, None, None, None, None, 128)


@needs_triton
def test_kernel_all_rows_empty_and_broadcast_mask(triton_kernel):
    g = torch.Generator().manual_seed(torch.seed())
    q, k, v, rh, rw = make_inputs(g, 2, 64, 64, 2, 2, 32, torch.float32, rel=(8, 8))
    mask = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    out = run_kernel(triton_kernel, q, k, v, mask, rh, rw, None, 32)
    assert (out == 0).all()
    mask = torch.tensor([[[[True, False], [False, True]]]])  # broadcast over batch and heads
    out = run_kernel(triton_kernel, q, k, v, mask, rh, rw, None, 32)
    check(out, q, k, v, mask, rh, rw, None, 32)


@needs_triton
def test_kernel_varlen(triton_kernel):
    g = torch.Generator().manual_seed(torch.seed())
    lens_q, lens_k = [5, 70, 0, 33], [40, 9, 17, 64]
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)
    for dtype in (torch.float16, torch.float32):
        q = torch.randn(int(cu_q[-1]), 4, 32, generator=g).to(dtype)
        k = torch.randn(int(cu_k[-1]), 2, 32, generator=g).to(dtype)
        v = torch.randn(int(cu_k[-1]), 2, 32, generator=g).to(dtype)
        mask = torch.rand(4, 4, 3, 2, generator=g) < 0.7
        out = block_sparse_attn_varlen(q, k, v, cu_q, cu_k, 70, 64, mask, block_size=32)
        for i in range(4):
            qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
            if qe == qs:
                continue
            m = mask[i : i + 1, :, : -(-(qe - qs) // 32), : -(-(ke - ks) // 32)]
            check(out[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], m, None, None, None, 32)


@needs_triton
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_kernel_property(triton_kernel, data):
    run_property_case(data, through_kernel=True)


# ------------------------------------------------------------------------------------------------
# The reference path (what CPU users run)
# ------------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_reference_property(data):
    run_property_case(data, through_kernel=False)


def run_property_case(data, through_kernel):
    """Random shapes, masks, densities, dtypes, head dims, GQA, rel-pos on/off, raster/tiled keys,
    lengths that are not multiples of the block, non-contiguous inputs, through the public API."""
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), label="dtype")
    D = data.draw(st.sampled_from([16, 32, 48, 64, 80] if through_kernel else [16, 32, 64, 80, 96, 128, 256]))
    Hk = data.draw(st.sampled_from([1, 2]))
    H = Hk * data.draw(st.sampled_from([1, 2]))
    B = data.draw(st.integers(1, 2))
    bs = data.draw(st.sampled_from([16, 32, 64]))
    use_rel = data.draw(st.booleans(), label="rel")
    if use_rel:
        kh, kw = data.draw(st.sampled_from([(4, 16), (8, 8), (7, 9), (2, 64), (16, 4), (5, 20)]), label="grid")
        tiles = [t for t in [(2, 8), (4, 4), (1, 4), (2, 2)] if kh % t[0] == 0 and kw % t[1] == 0]
        tile = data.draw(st.sampled_from([None] + tiles), label="tile")
        Nk = kh * kw
        Nq = Nk if data.draw(st.booleans(), label="self") else data.draw(st.integers(1, 150))
    else:
        tile, kh, kw = None, None, None
        Nq, Nk = data.draw(st.integers(1, 150)), data.draw(st.integers(1, 150))
    noncontig = Nq == Nk and data.draw(st.booleans(), label="noncontig")
    q, k, v, rh, rw = make_inputs(g, B, Nq, Nk, H, Hk, D, dtype, rel=(kh, kw) if use_rel else None,
                                  noncontig=noncontig, rel_transposed=data.draw(st.booleans(), label="rel_T"))
    density = data.draw(st.sampled_from([None, 1.0, 0.5, 0.2]), label="density")
    mask = None
    if density is not None:
        mb, mh = data.draw(st.sampled_from([(B, H), (1, H), (B, 1), (1, 1)]), label="mask_bcast")
        mask = random_mask(g, mb, mh, Nq, Nk, bs, density, empty_block=False)
    scale = data.draw(st.sampled_from([None, 0.3]), label="scale")
    if through_kernel:
        out = block_sparse_attn(q, k, v, mask, rel_h=rh, rel_w=rw, key_tile=tile, softmax_scale=scale, block_size=bs)
    else:
        os.environ.pop("SAM_SPARSE_FORCE_TRITON", None)
        out = block_sparse_attn(q, k, v, mask, rel_h=rh, rel_w=rw, key_tile=tile, softmax_scale=scale, block_size=bs)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    check(out, q, k, v, mask, rh, rw, tile, bs, scale=scale)


def test_reference_varlen_and_empty_rows():
    g = torch.Generator().manual_seed(torch.seed())
    cu = torch.tensor([0, 3, 3, 40], dtype=torch.int32)
    q, k, v = (torch.randn(40, 2, 16, generator=g) for _ in range(3))
    mask = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    mask[2, :, 0, 0] = True
    out = block_sparse_attn_varlen(q, k, v, cu, cu, 37, 37, mask, block_size=16)
    assert (out[:3] == 0).all() and torch.isfinite(out).all()
    check(out[None, 3:40], q[None, 3:40], k[None, 3:40], v[None, 3:40], mask[2:3], None, None, None, 16)


def test_reference_large_grid_holds_no_nxn(monkeypatch):
    """The reference path works in query chunks: force tiny chunks and still match the oracle."""
    from sam_sparse.kernels import reference

    monkeypatch.setattr(reference, "_MAX_SCORE_ELEMS", 2 * 64 * 10)
    g = torch.Generator().manual_seed(torch.seed())
    q, k, v, rh, rw = make_inputs(g, 1, 64, 64, 2, 2, 16, torch.float32, rel=(8, 8))
    out = block_sparse_attn(q, k, v, rel_h=rh, rel_w=rw, block_size=16)
    check(out, q, k, v, None, rh, rw, None, 16)


# ------------------------------------------------------------------------------------------------
# API contract: block lists, torch.compile, errors
# ------------------------------------------------------------------------------------------------

def test_block_layout_lists_and_round_trip():
    m = torch.tensor([[[[True, False, True], [False, False, False]]]])
    layout = BlockLayout.from_mask(m, 32)
    assert layout.kv_num_blocks.tolist() == [[[2, 0]]] and layout.kv_indices[0, 0, 0, :2].tolist() == [0, 2]
    assert layout.shape == (1, 1, 2, 3) and layout.block_size == 32
    assert torch.equal(layout.to_mask(), m)
    g = torch.Generator().manual_seed(torch.seed())
    m = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    assert torch.equal(BlockLayout.from_mask(m, 64).to_mask(), m)


def test_compile_fullgraph_has_no_graph_break():
    g = torch.Generator().manual_seed(0)
    q, k, v, rh, rw = make_inputs(g, 1, 64, 64, 2, 2, 16, torch.float32, rel=(8, 8))
    mask = torch.rand(1, 2, 4, 4, generator=g) < 0.5

    def f(q, k, v, rh, rw):
        return block_sparse_attn(q * 1.0, k, v, mask, rel_h=rh, rel_w=rw, block_size=16) + 1

    reset_dynamo()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, rh, rw), f(q, k, v, rh, rw))


@pytest.mark.parametrize("name", ["block_sparse_attn", "block_sparse_attn_varlen", "window_attn"])
def test_ops_have_no_python_autograd_layer(name):
    """A compiled graph calls these ops once per attention layer, host-bound at batch 1: they are defined on a
    Library with one implementation, not through torch.library.custom_op, whose Python autograd and dispatch
    layers cost each call 3-25 us more (docs/benchmarks.md, run 77)."""
    qualname = f"sam_sparse::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CompositeExplicitAutograd")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd")


def test_custom_op_opcheck():
    from sam_sparse.kernels.interface import _attn_op

    g = torch.Generator().manual_seed(0)
    q, k, v, rh, rw = make_inputs(g, 1, 32, 32, 2, 1, 16, torch.float32, rel=(4, 8))
    mask = torch.rand(1, 2, 2, 2, generator=g) < 0.7
    layout = BlockLayout.from_mask(mask, 16)
    args = (q, k, v, layout.kv_num_blocks, layout.kv_indices, rh, rw, None, 0.25, 16)
    torch.library.opcheck(_attn_op, args, test_utils=("test_schema", "test_faketensor"))


def _args(**over):
    g = torch.Generator().manual_seed(0)
    q, k, v, rh, rw = make_inputs(g, 2, 64, 64, 4, 2, 32, torch.float32, rel=(8, 8))
    base = dict(q=q, k=k, v=v, block_mask=None, rel_h=rh, rel_w=rw, key_tile=None, block_size=32)
    base.update(over)
    return base


def _call(a):
    return block_sparse_attn(a["q"], a["k"], a["v"], a["block_mask"], rel_h=a["rel_h"], rel_w=a["rel_w"],
                             key_tile=a["key_tile"], block_size=a["block_size"], softmax_scale=a.get("softmax_scale"))


BAD_INPUTS = [
    (dict(q=torch.randn(2, 64, 4)), r"q has shape \(2, 64, 4\).*expected 4-D"),
    (dict(q=torch.randn(2, 64, 4, 32, dtype=torch.float64)), r"q has .*float64.*supported dtypes"),
    (dict(k=torch.randn(3, 64, 2, 32), v=torch.randn(3, 64, 2, 32)), r"k has batch 3 but q has batch 2"),
    (dict(k=torch.randn(2, 64, 3, 32), v=torch.randn(2, 64, 3, 32)), r"q has 4 heads and k has 3"),
    (dict(v=torch.randn(2, 60, 2, 32)), r"k and v must have the same shape but for the head dim"),
    (dict(v=torch.randn(2, 64, 2, 20)), r"v's headdim 20 .* multiples of 8 from 16 to 256"),
    (dict(q=torch.randn(2, 64, 4, 36), k=torch.randn(2, 64, 2, 36), v=torch.randn(2, 64, 2, 36), rel_h=None, rel_w=None),
     r"headdim 36 .* multiples of 8 from 16 to 256"),
    (dict(q=torch.randn(2, 64, 4, 264), k=torch.randn(2, 64, 2, 264), v=torch.randn(2, 64, 2, 264), rel_h=None,
          rel_w=None), r"headdim 264 .* multiples of 8 from 16 to 256"),
    (dict(k=torch.randn(2, 64, 2, 32).half(), v=torch.randn(2, 64, 2, 32).half()), r"k has dtype torch.float16 but q has torch.float32"),
    (dict(block_mask=torch.ones(2, 4, 2, 3, dtype=torch.bool)), r"block_mask with shape \(2, 4, 2, 3\); expected \(2 or 1, 4 or 1, 2, 2\)"),
    (dict(block_mask=torch.ones(2, 4, 2, 2)), r"block_mask has .*torch.float32.*expected a BlockLayout or a bool tensor"),
    (dict(block_size=24), r"block_size=24: expected a power of two from 16"),
    (dict(block_size=48), r"block_size=48: expected a power of two from 16"),
    (dict(key_tile=(1.5, 2)), r"key_tile=\(1.5, 2\): expected a pair \(th, tw\) of positive ints"),
    (dict(softmax_scale=float("nan")), r"softmax_scale=nan: expected a finite number"),
    (dict(softmax_scale=0.0), r"softmax_scale=0.0: expected a finite number > 0"),
    (dict(softmax_scale=-0.125), r"softmax_scale=-0.125: expected a finite number > 0"),
    (dict(softmax_scale="0.5"), r"softmax_scale='0.5': expected a finite number > 0"),
    (dict(softmax_scale=True), r"softmax_scale=True: expected a finite number > 0"),
    (dict(rel_h=torch.randn(2, 4, 64, 4)), r"kh \* kw = 32 != seqlen_k = 64"),
    (dict(rel_w=None), r"rel_h and rel_w go together"),
    (dict(rel_h=torch.randn(2, 4, 60, 8)), r"rel_h has shape \(2, 4, 60, 8\).*expected \(2, 4, 64, kh\)"),
    (dict(key_tile=(3, 4)), r"key_tile=\(3, 4\) must divide the key grid \(8, 8\)"),
    (dict(rel_h=None, rel_w=None, key_tile=(2, 2)), r"key_tile describes the key order"),
    (dict(q="not a tensor"), r"q must be a torch.Tensor, got str"),
]


@pytest.mark.parametrize("over,match", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _call(_args(**over))


def test_wrong_device_is_named():
    a = _args()
    a["block_mask"] = torch.ones(2, 4, 2, 2, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match=r"block_mask is on meta but q is on cpu"):
        _call(a)


@pytest.mark.parametrize(
    "cu,match",
    [
        (torch.tensor([0, 10, 64]), r"cu_seqlens_q has .*int64.*expected a 1-D int32"),
        (torch.tensor([0, 40, 30, 64], dtype=torch.int32), r"must start at 0, never decrease and end at 64"),
        (torch.tensor([0, 10, 60], dtype=torch.int32), r"end at 64"),
    ],
)
def test_varlen_bad_cu_seqlens(cu, match):
    q = torch.randn(64, 2, 16)
    with pytest.raises(ValueError, match=match):
        block_sparse_attn_varlen(q, q, q, cu, cu, 64, 64)


def test_varlen_max_seqlen_too_small():
    q = torch.randn(64, 2, 16)
    cu = torch.tensor([0, 10, 64], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"below the longest sequences \(54, 54\)"):
        block_sparse_attn_varlen(q, q, q, cu, cu, 32, 64)


def test_import_and_cpu_path_without_triton(tmp_path):
    """Where no Triton wheel exists, `import sam_sparse` works and CPU tensors use the reference path."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail, as when not installed
        "import importlib.util as u; u.find_spec = (lambda f: (lambda n, *a: None if n == 'triton' else f(n, *a)))(u.find_spec)\n"
        "import torch, sam_sparse\n"
        "from sam_sparse.kernels import interface\n"
        "assert not interface.HAS_TRITON\n"
        "q = torch.randn(1, 40, 2, 16)\n"
        "out = sam_sparse.block_sparse_attn(q, q, q, rel_h=torch.randn(1, 2, 40, 5), rel_w=torch.randn(1, 2, 40, 8))\n"
        "assert torch.isfinite(out).all() and out.shape == q.shape\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@needs_triton
def test_interpreter_takes_the_index_of_a_one_element_scalar():
    """Triton's interpreter before 3.8 took int() of a scalar's 1-element array, which NumPy >= 2.4 refuses:
    every loop bounded by a run-time value failed (every interpreter test on the GPU machines' Triton 3.6,
    run 37). patch_interpreter_for_numpy makes it squeeze first, as Triton 3.8 does."""
    import operator

    import numpy as np
    from triton.runtime import interpreter

    from sam_sparse.kernels.triton_util import patch_interpreter_for_numpy

    patch_interpreter_for_numpy()
    patch_interpreter_for_numpy()  # idempotent: one wrapper

    class Handle:
        data = np.array([7], dtype=np.int32)

    class Scalar:
        handle = Handle()

    scope = interpreter._LangPatchScope()
    interpreter._patch_lang_tensor(Scalar, scope)
    try:
        assert operator.index(Scalar()) == 7
        assert list(range(Scalar())) == list(range(7))
    finally:
        scope.restore()
    assert not hasattr(Scalar, "__index__")  # the scope puts everything back
