"""window_attn: attention inside the non-overlapping windows of a token grid, on the CPU.

Three implementations against the float64 oracle of tests/oracle.py (oracle_window: one window at a
time, tokens gathered by explicit (y, x) lists): the PyTorch reference (attention_reference_window),
the public window_attn (the reference path on CPU tensors) and the Triton kernel in Triton's
interpreter. Every case draws fresh random inputs; the seed is in each failure message.

Rule (flash-attn's, as test_kernel.py): error <= 2x the error of the same computation done by PyTorch
in the same dtype, plus a small floor, globally and per query row; never NaN. The kernel writes into
an output poisoned with NaN first, so a query it never writes shows up.
"""

import os

import pytest
import torch

from oracle import check_window, oracle_window, rel_error
from sam_sparse.bench import reset_dynamo
from sam_sparse.kernels import BlockLayout, window_attn
from sam_sparse.kernels.reference import attention_reference_window
from sam_sparse.kernels.interface import HAS_TRITON  # platforms without Triton: the PyTorch path still serves

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROW_FLOOR = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


def grid_inputs(g, B, GH, GW, H, Hk, D, dtype, window=None, noncontig=False, pads=True):
    """q (B, GH, GW, H, D), k, v (B, GH, GW, Hk, D), k_pad, v_pad (Hk, D) or None, rel_h, rel_w or None.

    noncontig: q, k, v are strided views of one fused (B, GH, GW, 3, H, D) projection (SAM's qkv).
    window: (wh, ww) gives random rel_h (B, H, GH * GW, wh) and rel_w (B, H, GH * GW, ww), sizeable
    (SAM zero-initializes rel_pos; random terms make the bias matter)."""

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if noncontig:
        q, k, v = rnd(B, GH, GW, 3, H, D).unbind(3)
        k, v = k[..., :Hk, :], v[..., :Hk, :]
        assert not q.is_contiguous() and not k.is_contiguous()
    else:
        q, k, v = rnd(B, GH, GW, H, D), rnd(B, GH, GW, Hk, D), rnd(B, GH, GW, Hk, D)
    k_pad, v_pad = (rnd(Hk, D), rnd(Hk, D)) if pads else (None, None)
    rel_h = rel_w = None
    if window is not None:
        rel_h, rel_w = rnd(B, H, GH * GW, window[0]) * 2, rnd(B, H, GH * GW, window[1]) * 2
    return q, k, v, k_pad, v_pad, rel_h, rel_w


def plant_neg_inf(g, rel_h, n_partial=5, n_empty=3):
    """-inf in rel_h: on the first key row of the window for n_partial random queries (those keys drop
    out) and on every key row for n_empty others (nothing left: their output must be zeros). Returns
    the (b, h, query) triples of the empty ones."""
    rel_h = rel_h.clone()
    B, H, N, _ = rel_h.shape
    rows = torch.randperm(N, generator=g)[: n_partial + n_empty]
    heads = torch.randint(0, H, (n_partial + n_empty,), generator=g)
    batches = torch.randint(0, B, (n_partial + n_empty,), generator=g)
    empty = []
    for i, (b, h, n) in enumerate(zip(batches.tolist(), heads.tolist(), rows.tolist())):
        if i < n_partial:
            rel_h[b, h, n, 0] = float("-inf")
        else:
            rel_h[b, h, n, :] = float("-inf")
            empty.append((b, h, n))
    return rel_h, empty


def random_mask(g, Bm, Hm, tokens, bs, density=0.6, empty_row=True):
    """bool (Bm, Hm, QB, KB) over one window's tokens; with empty_row, query block 0 of the first
    (window, head) attends to nothing (zeros)."""
    nb = -(-tokens // bs)
    m = torch.rand(Bm, Hm, nb, nb, generator=g) < density
    if empty_row:
        m[0, 0, 0] = False
    return m


def check(out, q, k, v, window, k_pad, v_pad, mask=None, rel_h=None, rel_w=None, scale=None, bs=128, seed=None,
          empty=()):
    """oracle.check_window with this file's floors (float64 and float32 inputs on the CPU)."""
    return check_window(out, q, k, v, window, k_pad, v_pad, mask, rel_h, rel_w, scale, bs, seed, FLOOR, ROW_FLOOR, empty)


def mask_empty_rows(mask, B, GH, GW, window, bs):
    """(b, h, raster query) of the on-grid queries in an empty query block of the mask (zeros)."""
    wh, ww = window
    n_cols, n_win = -(-GW // ww), -(-GH // wh) * -(-GW // ww)
    H_m = mask.shape[1]
    out = []
    for bm, hm, qb in (~mask.any(-1)).nonzero().tolist():
        for b in range(B):
            for w in range(n_win):
                if mask.shape[0] != 1 and bm != b * n_win + w:
                    continue
                wy, wx = divmod(w, n_cols)
                for t in range(qb * bs, min((qb + 1) * bs, wh * ww)):
                    y, x = wy * wh + t // ww, wx * ww + t % ww
                    if y < GH and x < GW:
                        out.append((b, hm if H_m > 1 else None, y * GW + x))
    return out


def expand_heads(rows, H):
    return [(b, h, n) for b, hm, n in rows for h in ([hm] if hm is not None else range(H))]


# ------------------------------------------------------------------------------------------------
# (a) The PyTorch reference against the oracle
# ------------------------------------------------------------------------------------------------

# (B, GH, GW, window, H, Hk, D, rel, mask (Bm, Hm) at block size 16 or None, dtype, neg_inf, scale)
REF_CASES = [
    (2, 9, 7, (4, 3), 4, 2, 16, True, None, torch.float32, True, None),     # overhang on both sides
    (1, 6, 6, (3, 3), 4, 1, 32, False, None, torch.float64, False, None),   # exact multiple, MQA
    (2, 5, 8, (5, 4), 2, 2, 80, True, "full", torch.float32, False, None),  # 20 tokens: 2 x 2 blocks
    (1, 10, 10, (4, 4), 4, 2, 32, True, "full", torch.float64, True, 0.3),  # 16 tokens: one block
    (2, 11, 13, (5, 5), 4, 1, 16, True, (1, 4), torch.float32, True, None),  # 25 tokens: 2 blocks, bcast batch
    (1, 14, 14, (7, 7), 2, 1, 16, True, (None, 1), torch.float64, False, None),  # per window, bcast heads
    (1, 20, 20, (7, 7), 2, 2, 80, True, None, torch.float32, True, None),   # SAM-like: 20 = 2 x 7 + 6
    (2, 3, 2, (4, 4), 2, 1, 16, True, (1, 1), torch.float32, False, None),  # grid smaller than one window
    (1, 5, 6, (1, 6), 4, 2, 16, True, None, torch.float64, False, None),    # one-row windows
    (1, 7, 3, (7, 1), 2, 1, 32, True, "full", torch.float32, True, None),   # one-column windows
]


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: f"{c[1]}x{c[2]}w{c[3][0]}x{c[3][1]}-H{c[4]}k{c[5]}-D{c[6]}")
def test_reference_matches_oracle(case):
    B, GH, GW, window, H, Hk, D, rel, mask_kind, dtype, neg_inf, scale = case
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, B, GH, GW, H, Hk, D, dtype, window if rel else None,
                                          noncontig=seed % 2 == 0)
    empty = []
    if neg_inf:
        rh, empty = plant_neg_inf(g, rh)
    mask, bs = None, 16
    if mask_kind is not None:
        n_win = -(-GH // window[0]) * -(-GW // window[1])
        Bm, Hm = (B * n_win, H) if mask_kind == "full" else mask_kind
        mask = random_mask(g, Bm if Bm is not None else B * n_win, Hm, window[0] * window[1], bs)
        empty += expand_heads(mask_empty_rows(mask, B, GH, GW, window, bs), H)
    out = attention_reference_window(q, k, v, window, kp, vp, mask, rh, rw, D**-0.5 if scale is None else scale, bs)
    check(out, q, k, v, window, kp, vp, mask, rh, rw, scale, bs, seed, empty)


def test_reference_window_of_one_token_copies_v():
    """A 1 x 1 window: every query sees only its own key, so the output is v (repeated over a GQA group)."""
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 2, 5, 4, 4, 2, 16, torch.float64, (1, 1))
    out = attention_reference_window(q, k, v, (1, 1), kp, vp, None, rh, rw, 0.25, 16)
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=3), rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


def test_oracle_pads_are_what_partition_gives():
    """The oracle's own premise, checked by hand on one window: a query at the grid's corner sees the
    on-grid keys of its window plus (wh * ww - on-grid) copies of k_pad / v_pad."""
    seed, g = seeded()
    q, k, v, kp, vp, _, _ = grid_inputs(g, 1, 5, 5, 1, 1, 16, torch.float64, None)
    out = oracle_window(q, k, v, (3, 3), kp, vp)
    keys = torch.cat([k[0, 3:5, 3:5, 0].reshape(4, 16), kp.expand(5, 16)])
    vals = torch.cat([v[0, 3:5, 3:5, 0].reshape(4, 16), vp.expand(5, 16)])
    p = torch.softmax(keys @ q[0, 4, 4, 0] * 0.25, dim=0)
    torch.testing.assert_close(out[0, 4, 4, 0], p @ vals, rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


# ------------------------------------------------------------------------------------------------
# (b) The public window_attn on CPU tensors (the reference path)
# ------------------------------------------------------------------------------------------------

# (B, GH, GW, window, H, Hk, D, rel, mask (Bm, Hm) or None, block size, dtype, noncontig, pads)
API_CASES = [
    (2, 9, 7, (4, 3), 4, 2, 16, True, None, None, torch.float32, True, True),
    (1, 10, 10, (4, 4), 4, 1, 32, True, "full", 16, torch.float32, True, False),   # pads None: zeros
    (2, 11, 13, (5, 5), 2, 2, 80, True, (1, 2), 16, torch.float16, True, True),
    (1, 8, 12, (4, 6), 2, 1, 64, False, (1, 1), 16, torch.bfloat16, False, False),
    (1, 20, 20, (7, 7), 4, 4, 32, True, "full", 32, torch.float32, False, True),   # 49 tokens: 2 blocks of 32
]


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: f"{c[1]}x{c[2]}w{c[3][0]}x{c[3][1]}-{str(c[10])[6:]}")
@pytest.mark.parametrize("as_layout", [False, True])
def test_window_attn_cpu_matches_oracle(case, as_layout):
    os.environ.pop("SAM_SPARSE_FORCE_TRITON", None)
    B, GH, GW, window, H, Hk, D, rel, mask_kind, bs, dtype, noncontig, pads = case
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, B, GH, GW, H, Hk, D, dtype, window if rel else None,
                                          noncontig=noncontig, pads=pads)
    empty = []
    if rel:
        rh, empty = plant_neg_inf(g, rh)
    mask, masked_out = case_mask(g, mask_kind, B, GH, GW, window, H, bs)
    empty += masked_out
    arg = BlockLayout.from_mask(mask, bs) if (as_layout and mask is not None) else mask
    kwargs = dict(block_size=bs) if not (as_layout and mask is not None) else {}
    out = window_attn(q, k, v, window, arg, k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw, **kwargs)
    assert out.is_contiguous(), f"seed {seed}: the output must be contiguous"
    check(out, q, k, v, window, kp, vp, mask, rh, rw, None, bs if bs else 128, seed, empty)
    again = window_attn(q, k, v, window, arg, k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw, **kwargs)  # cached plan
    torch.testing.assert_close(again, out, rtol=0, atol=0, msg=f"seed {seed}")


def test_window_attn_scale_and_fp32_pads_with_fp16_inputs():
    """softmax_scale is used; k_pad / v_pad in float32 with fp16 inputs are taken in k's dtype."""
    seed, g = seeded()
    q, k, v, _, _, rh, rw = grid_inputs(g, 1, 7, 9, 2, 1, 16, torch.float16, (4, 4))
    kp, vp = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    out = window_attn(q, k, v, (4, 4), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw, softmax_scale=0.7)
    check(out, q, k, v, (4, 4), kp.half(), vp.half(), None, rh, rw, 0.7, 128, seed)


def test_window_attn_under_inference_mode():
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 2, 9, 10, 2, 1, 32, torch.float32, (4, 4), noncontig=True)
    mask = random_mask(g, 1, 2, 16, 16)
    with torch.inference_mode():
        qg = q.clone().requires_grad_(False)
        out = window_attn(qg, k, v, (4, 4), BlockLayout.from_mask(mask, 16), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw)
        out2 = window_attn(qg, k, v, (4, 4), BlockLayout.from_mask(mask, 16), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw)
    assert out.is_inference(), f"seed {seed}"
    torch.testing.assert_close(out2, out, rtol=0, atol=0, msg=f"seed {seed}")
    empty = expand_heads(mask_empty_rows(mask, 2, 9, 10, (4, 4), 16), 2)
    check(out, q, k, v, (4, 4), kp, vp, mask, rh, rw, None, 16, seed, empty)


def test_window_attn_refuses_grad_but_runs_under_no_grad():
    g = torch.Generator().manual_seed(0)
    q, k, v, kp, vp, _, _ = grid_inputs(g, 1, 4, 4, 2, 2, 16, torch.float32)
    q.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference-only"):
        window_attn(q, k, v, (2, 2), k_pad=kp, v_pad=vp)
    with torch.no_grad():
        out = window_attn(q, k, v, (2, 2), k_pad=kp, v_pad=vp)
    check(out, q.detach(), k, v, (2, 2), kp, vp, seed=0)


def test_window_attn_compile_fullgraph():
    g = torch.Generator().manual_seed(0)
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 1, 9, 7, 2, 1, 16, torch.float32, (4, 4))
    mask = random_mask(g, 1, 2, 16, 16)

    def f(q, k, v, rh, rw):
        return window_attn(q * 1.0, k, v, (4, 4), mask, k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw, block_size=16) + 1

    reset_dynamo()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, rh, rw), f(q, k, v, rh, rw))


# ------------------------------------------------------------------------------------------------
# (c) The Triton kernel itself, in the interpreter
# ------------------------------------------------------------------------------------------------

def case_mask(g, mask_kind, B, GH, GW, window, H, bs):
    """A case's random block mask (None, "full": one per window and head, or a broadcast (Bm, Hm)) and the
    (b, h, query) triples it leaves with no key."""
    if mask_kind is None:
        return None, []
    n_win = -(-GH // window[0]) * -(-GW // window[1])
    Bm, Hm = (B * n_win, H) if mask_kind == "full" else mask_kind
    mask = random_mask(g, Bm, Hm, window[0] * window[1], bs)
    return mask, expand_heads(mask_empty_rows(mask, B, GH, GW, window, bs), H)


def run_kernel(triton_attn, q, k, v, window, k_pad, v_pad, mask, rel_h, rel_w, bs, config, scale=None):
    """One launch into a NaN-poisoned output; None pads are zeros (the kernel always reads them)."""
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    lists = (None, None)
    if mask is not None:
        layout = BlockLayout.from_mask(mask, bs)
        lists = (layout.kv_num_blocks, layout.kv_indices)
    Hk, D = k.shape[-2:]
    kp = (torch.zeros(Hk, D) if k_pad is None else k_pad).to(k.dtype).contiguous()
    vp = (torch.zeros(Hk, D) if v_pad is None else v_pad).to(v.dtype).contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cfg = dict(num_warps=4, num_stages=2, **config)
    triton_attn.attention_triton(q, k, v, *lists, rel_h, rel_w, None, scale, bs, window=tuple(window),
                                 k_pad=kp, v_pad=vp, out=out, config=cfg)
    return out


# (B, GH, GW, window, H, Hk, D, rel, mask (Bm, Hm) or None, block size, dtype, noncontig). Tiny: the
# interpreter runs each program in Python.
KERNEL_CASES = [
    # 16 tokens = one 16-key tile, grid not a multiple of the window: rect bias path, padding keys
    (1, 6, 7, (4, 4), 2, 1, 16, True, None, 32, torch.float32, True),
    # 9 tokens, batch 2, per-window mask with empty rows, -inf bias: one-hot path, partial key tile
    (2, 5, 5, (3, 3), 2, 2, 32, True, "full", 32, torch.float16, False),
    # 64 tokens = 2 x 2 mask blocks of 32, D = 80 (two head-dim chunks), MQA
    (1, 9, 10, (8, 8), 2, 1, 80, True, (1, 2), 32, torch.float16, True),
    # one-row key rectangles (2 x 16 window, 16-key tiles), rel_h prefetch, no mask
    (1, 3, 17, (2, 16), 4, 2, 16, True, None, 32, torch.bfloat16, False),
    # SAM's 7 x 7-style odd window (one-hot), batch 2, mask shared by every window, fp32
    (2, 9, 8, (7, 7), 2, 2, 16, True, (1, 1), 32, torch.float32, True),
    # a grid smaller than one window: 6 tokens on the grid, 10 padding keys
    (2, 3, 2, (4, 4), 2, 1, 32, True, None, 32, torch.float16, True),
    # the grid a multiple of the window: no padding, the inner windows' launch only
    (1, 8, 6, (4, 3), 2, 1, 16, True, (1, 1), 32, torch.float32, True),
    # only the last row of windows overhangs (7 rows of 4-row windows, 6 columns of 3)
    (2, 7, 6, (4, 3), 2, 2, 16, True, None, 32, torch.float32, False),
    # only the last column overhangs
    (1, 8, 5, (4, 3), 2, 1, 16, True, None, 32, torch.float32, True),
]


@needs_triton
@pytest.mark.parametrize("config", [dict(BLOCK_M=16, BLOCK_N=16), dict(BLOCK_M=32, BLOCK_N=16)],
                         ids=["16x16", "32x16"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[1]}x{c[2]}w{c[3][0]}x{c[3][1]}-D{c[6]}")
def test_kernel_matches_oracle(triton_kernel, case, config):
    B, GH, GW, window, H, Hk, D, rel, mask_kind, bs, dtype, noncontig = case
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, B, GH, GW, H, Hk, D, dtype, window if rel else None, noncontig=noncontig)
    empty = []
    if rel:
        rh, empty = plant_neg_inf(g, rh, n_partial=3, n_empty=2)
    mask, masked_out = case_mask(g, mask_kind, B, GH, GW, window, H, bs)
    empty += masked_out
    out = run_kernel(triton_kernel, q, k, v, window, kp, vp, mask, rh, rw, bs, config)
    check(out, q, k, v, window, kp, vp, mask, rh, rw, None, bs, seed, empty)


@needs_triton
@pytest.mark.parametrize("mode", [2, 3], ids=["onehot", "gather"])
def test_kernel_forced_bias_paths(triton_kernel, monkeypatch, mode):
    """The one-hot and gather bias paths on a window where the tuner would pick the rectangle."""
    monkeypatch.setattr(triton_kernel, "FORCE_BIAS_PATH", mode)
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 1, 7, 6, 2, 1, 16, torch.float32, (4, 4), noncontig=True)
    out = run_kernel(triton_kernel, q, k, v, (4, 4), kp, vp, None, rh, rw, 128, dict(BLOCK_M=16, BLOCK_N=16))
    check(out, q, k, v, (4, 4), kp, vp, None, rh, rw, None, 128, seed)


@needs_triton
def test_kernel_wdot_bf16(triton_kernel):
    """rel_w added through rel_w @ I (W_DOT, bf16, one 16-key grid row per tile)."""
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 1, 3, 17, 2, 2, 16, torch.bfloat16, (2, 16))
    rh, empty = plant_neg_inf(g, rh, n_partial=2, n_empty=1)
    out = run_kernel(triton_kernel, q, k, v, (2, 16), kp, vp, None, rh, rw, 32, dict(BLOCK_M=16, BLOCK_N=16, W_DOT=1))
    check(out, q, k, v, (2, 16), kp, vp, None, rh, rw, None, 32, seed, empty)


def test_window_op_passes_opcheck():
    """torch.compile's contract for the custom op: schema, fake tensor (shape, dtype, contiguity), autograd
    registration, on the reference path."""
    from sam_sparse.kernels import interface

    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 1, 5, 6, 2, 1, 16, torch.float32, (4, 4), noncontig=True)
    torch.library.opcheck(interface._window_op, (q, k, v, kp, vp, None, None, rh, rw, [4, 4], [4, 4], 0.25, 128))


def test_window_attn_fast_path_reuses_the_plan(monkeypatch):
    """A repeated call with the same signature skips the checks and the planner, and gives the same
    output; a call that needs a conversion (None pads) is never served from the fast path."""
    from sam_sparse.kernels import interface

    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 1, 6, 5, 2, 1, 16, torch.float32, (4, 4), noncontig=True)
    first = window_attn(q, k, v, (4, 4), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw)
    made = []
    real = interface._new_plan
    monkeypatch.setattr(interface, "_new_plan", lambda *a, **kw: made.append(1) or real(*a, **kw))
    monkeypatch.setattr(interface, "_check_qkv", lambda *a, **kw: pytest.fail("the fast path ran the checks"))
    again = window_attn(q, k, v, (4, 4), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw)
    assert not made and torch.equal(first, again), f"seed {seed}"
    monkeypatch.undo()
    no_pads = window_attn(q, k, v, (4, 4), rel_h=rh, rel_w=rw)
    ref = oracle_window(q, k, v, (4, 4), None, None, None, rh, rw)
    assert rel_error(no_pads, ref) < 1e-5, f"seed {seed}"
    monkeypatch.setattr(interface, "_check_qkv", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("checked")))
    with pytest.raises(RuntimeError, match="checked"):  # None pads: converted, so always checked
        window_attn(q, k, v, (4, 4), rel_h=rh, rel_w=rw)


@needs_triton
def test_window_attn_through_the_kernel(triton_kernel):
    """The public API with the kernel behind it (interpreter): plan, None pads (zeros), layout, strides."""
    seed, g = seeded()
    q, k, v, _, _, rh, rw = grid_inputs(g, 1, 6, 5, 2, 1, 16, torch.float16, (4, 4), noncontig=True, pads=False)
    mask = random_mask(g, 1, 2, 16, 16)
    layout = BlockLayout.from_mask(mask, 16)
    out = window_attn(q, k, v, (4, 4), layout, rel_h=rh, rel_w=rw, softmax_scale=0.3)
    empty = expand_heads(mask_empty_rows(mask, 1, 6, 5, (4, 4), 16), 2)
    check(out, q, k, v, (4, 4), None, None, mask, rh, rw, 0.3, 16, seed, empty)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_logits_below_the_cut_mean_no_key(triton_kernel, monkeypatch, dtype):
    """Issue 25, item 8: the kernel (interpreter) and the PyTorch path agree on queries whose keys all
    have logits at or below -1e38 * scale (zeros) or partly (those keys weigh nothing), padding keys
    included; both against the oracle with those keys -inf."""
    seed, g = seeded()
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 1, 6, 7, 2, 1, 16, dtype, (4, 4))
    scale = 16**-0.5
    below = -1.5e38 * scale
    rh, _ = plant_neg_inf(g, rh, n_partial=4, n_empty=0)
    rh = rh.masked_fill(torch.isneginf(rh), below)  # the first key row of 4 queries below the cut
    rh[:, :, [0, 13, 41]] = below  # every key of these queries (41: a window that overhangs the grid)
    empty = [(0, h, n) for h in range(2) for n in (0, 13, 41)]
    kernel = window_attn(q, k, v, (4, 4), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw)
    monkeypatch.delenv("SAM_SPARSE_FORCE_TRITON")
    reference = window_attn(q, k, v, (4, 4), k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw)
    as_inf = rh.masked_fill(rh <= below / 2, float("-inf"))
    for out in (kernel, reference):
        assert (out.flatten(1, 2)[:, [0, 13, 41]] == 0).all(), f"seed {seed}"
        check(out, q, k, v, (4, 4), kp, vp, None, as_inf, rw, None, 128, seed, empty)


# ------------------------------------------------------------------------------------------------
# (d) Bad inputs: ValueError naming the argument and what is accepted
# ------------------------------------------------------------------------------------------------

def _args(**over):
    g = torch.Generator().manual_seed(0)
    q, k, v, kp, vp, rh, rw = grid_inputs(g, 1, 6, 7, 2, 1, 16, torch.float32, (4, 3))
    base = dict(q=q, k=k, v=v, window_size=(4, 3), block_mask=None, k_pad=kp, v_pad=vp, rel_h=rh, rel_w=rw,
                block_size=None)
    base.update(over)
    return base


def _call(a):
    return window_attn(a["q"], a["k"], a["v"], a["window_size"], a["block_mask"], k_pad=a["k_pad"], v_pad=a["v_pad"],
                       rel_h=a["rel_h"], rel_w=a["rel_w"], block_size=a["block_size"])


# 6 x 7 grid, window (4, 3): 2 x 3 = 6 windows of 12 tokens; H = 2, Hk = 1, D = 16
BAD_INPUTS = [
    (dict(window_size=(0, 3)), r"window_size=\(0, 3\): expected a pair \(wh, ww\) of positive ints"),
    (dict(window_size=(4, -1)), r"window_size=\(4, -1\): expected a pair \(wh, ww\) of positive ints"),
    (dict(window_size=7), r"window_size=7: expected a pair \(wh, ww\) of positive ints"),
    (dict(window_size=(4, 3, 1)), r"window_size=\(4, 3, 1\): expected a pair"),
    (dict(window_size=(4.0, 3)), r"window_size=\(4.0, 3\): expected a pair"),
    (dict(q=torch.randn(1, 42, 2, 16)), r"q has shape \(1, 42, 2, 16\).*expected 5-D \(batch, grid_h, grid_w, nheads, headdim\)"),
    (dict(k=torch.randn(1, 6, 6, 1, 16), v=torch.randn(1, 6, 6, 1, 16)), r"k has the token grid \(6, 6\) but q has \(6, 7\)"),
    (dict(v=torch.randn(1, 6, 7, 2, 16)), r"k and v must have the same shape"),
    (dict(v=torch.randn(1, 6, 7, 1, 32)), r"k and v must have the same shape"),  # v's own head dim: not in windows
    (dict(k=torch.randn(2, 6, 7, 1, 16), v=torch.randn(2, 6, 7, 1, 16)), r"k has batch 2 but q has batch 1"),
    (dict(k=torch.randn(1, 6, 7, 3, 16), v=torch.randn(1, 6, 7, 3, 16)), r"q has 2 heads and k has 3; nheads must be a multiple"),
    (dict(q=torch.randn(1, 6, 7, 2, 16, dtype=torch.float64)), r"q has .*float64.*supported dtypes"),
    (dict(k_pad=torch.randn(2, 16)), r"k_pad has shape \(2, 16\).*expected a float tensor \(nheads_k, headdim\) = \(1, 16\)"),
    (dict(v_pad=torch.randn(16)), r"v_pad has shape \(16,\).*expected a float tensor \(nheads_k, headdim\) = \(1, 16\)"),
    (dict(k_pad=torch.ones(1, 16, dtype=torch.int64)), r"k_pad has .*int64.*expected a float tensor"),
    (dict(k_pad="zeros"), r"k_pad has str; expected a float tensor"),
    (dict(rel_h=torch.randn(1, 2, 42, 5)), r"kh \* kw = 15 != seqlen_k = 12"),
    (dict(rel_h=torch.randn(1, 2, 42, 3), rel_w=torch.randn(1, 2, 42, 4)),
     r"rel_h / rel_w have kh=3, kw=4; expected the window \(4, 3\)"),
    (dict(rel_h=torch.randn(1, 2, 40, 4)), r"rel_h has shape \(1, 2, 40, 4\).*expected \(1, 2, 42, kh\)"),
    (dict(rel_w=None), r"rel_h and rel_w go together"),
    (dict(block_mask=torch.ones(1, 2, 2, 2, dtype=torch.bool), block_size=16),
     r"block_mask with shape \(1, 2, 2, 2\); expected \(6 or 1, 2 or 1, 1, 1\) for block_size=16"),
    (dict(block_mask=torch.ones(2, 2, 1, 1, dtype=torch.bool), block_size=16),
     r"block_mask with shape \(2, 2, 1, 1\); expected \(6 or 1, 2 or 1, 1, 1\)"),
    (dict(block_mask=torch.ones(6, 2, 1, 1), block_size=16), r"block_mask has .*float32.*expected a BlockLayout or a bool tensor"),
    (dict(block_size=24), r"block_size=24: expected a power of two from 16"),
]


@pytest.mark.parametrize("over,match", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(over, match):
    with pytest.raises(ValueError, match=match):
        _call(_args(**over))


def test_bad_layout_and_empty_grid():
    a = _args(block_mask=BlockLayout.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), 16), block_size=32)
    with pytest.raises(ValueError, match=r"block_size=32 but the BlockLayout was built with block_size=16"):
        _call(a)
    a = _args(block_mask=BlockLayout.from_mask(torch.ones(1, 2, 2, 2, dtype=torch.bool), 16))
    with pytest.raises(ValueError, match=r"BlockLayout with shape \(1, 2, 2, 2\); expected \(6 or 1, 2 or 1, 1, 1\)"):
        _call(a)
    q = torch.randn(1, 0, 5, 2, 16)
    with pytest.raises(ValueError, match=r"the token grid \(0, 5\) is empty"):
        window_attn(q, q, q, (2, 2))
