"""Triton forward kernel for block-sparse attention with a fused decomposed 2-D relative-position bias.

One program computes BLOCK_M query rows of one (batch, head) and walks only the key blocks its mask
row lists (kv_num_blocks / kv_indices, as FlexAttention), with an fp32 online softmax (exp2 domain).

The bias rel_h[i, row(j)] + rel_w[i, col(j)] is formed per key tile in registers, one of three ways
(picked per config by _bias_mode; the autotuner then picks the fastest config):
  1 "rect":    the key tile is a TH x TW rectangle of the key grid, so the bias is a (BLOCK_M, TH) slice
               of rel_h broadcast against a (BLOCK_M, TW) slice of rel_w: no gather at all. When the
               tile is one grid row (SAM's raster 64 x 64 grid with 64-key tiles), rel_w is loaded once
               per program and rel_h, one value per query row, is folded into the running max. rel_w
               is then either added to the scores (W_DOT=0) or, in fp16/bf16, accumulated into them by
               the tensor cores as rel_w @ I (W_DOT=1); the autotuner keeps whichever is faster.
  2 "onehot":  small grids (windows, 14 x 14): rel_h / rel_w rows are loaded once per program and
               expanded with one-hot matrices on the tensor cores.
  3 "gather":  anything else: an element-wise gather from L1/L2 (slow, always correct).

Shapes: q (B, Nq, H, D) or varlen (total_q, H, D); k, v (B, Nk, Hk, D) or (total_k, Hk, D); any strides.
Head dims are split into two power-of-two parts when possible (80 = 64 + 16, 96 = 64 + 32) instead of
padding to the next power of two, which would waste 60% more tensor-core work at vit_h's 80.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

# The interpreter is chosen when kernels are defined (import time), so read the flag once here.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _split_head_dim(d: int) -> Tuple[int, int]:
    """(D0, D1): two power-of-two chunks covering d exactly (D1 may be 0), else (next pow2, 0) + masking."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    if rest == 0 or (rest >= 16 and rest & (rest - 1) == 0):
        return d0, rest
    return _next_pow2(d), 0


# Tests set this to 2 or 3 to exercise a bias path that autotuning would not pick on their shapes.
FORCE_BIAS_MODE: Optional[int] = None


def _bias_mode(args) -> int:
    if not args["HAS_BIAS"]:
        return 0
    if FORCE_BIAS_MODE is not None:
        return FORCE_BIAS_MODE
    bn, tile_h, tile_w = args["BLOCK_N"], args["tile_h"], args["tile_w"]
    tw = min(tile_w, bn)
    th = bn // tw
    rect = (
        tw & (tw - 1) == 0
        and th & (th - 1) == 0
        and th * tw == bn
        and tile_w % tw == 0
        and tile_h % th == 0
    )
    if rect:
        return 1
    if _next_pow2(args["KH"]) <= 64 and _next_pow2(args["KW"]) <= 64:
        return 2
    return 3


def _wdot_applies(args, block_n: int) -> bool:
    """W_DOT (a tuning choice) changes the code only where rel_w is hoisted for one grid row, in fp16/bf16."""
    return args["HAS_BIAS"] and not args["IS_FP32"] and block_n == args["tile_w"] == args["KW"]


def _rect_th(args) -> int:
    return args["BLOCK_N"] // min(args["tile_w"], args["BLOCK_N"])


def _rect_tw(args) -> int:
    return min(args["tile_w"], args["BLOCK_N"])


@triton.jit
def _attn_fwd(
    Q, K, V, Out,
    KV_NUM, KV_IDX,
    REL_H, REL_W,
    CU_Q, CU_K,
    sm_scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_numb, stride_numh, stride_numm,
    stride_idxb, stride_idxh, stride_idxm,
    stride_rhb, stride_rhh, stride_rhm, stride_rhk,
    stride_rwb, stride_rwh, stride_rwm, stride_rwk,
    seqlen_q, seqlen_k, batch, num_heads, kv_group,
    KH, KW, tile_h, tile_w,
    D_REAL: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    MASK_BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    IS_FP32: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS_MODE: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
    W_HOIST: tl.constexpr, W_DOT: tl.constexpr, USE_WDOT: tl.constexpr,
    KH_P: tl.constexpr, KW_P: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // kv_group

    if VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        seqlen_k = tl.load(CU_K + b + 1) - k_start
        if pid_m * BLOCK_M >= seqlen_q:
            return
        q_base = Q + q_start.to(tl.int64) * stride_qn + h * stride_qh
        k_base = K + k_start.to(tl.int64) * stride_kn + hk * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vn + hk * stride_vh
        o_base = Out + q_start.to(tl.int64) * stride_on + h * stride_oh
    else:
        q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
        v_base = V + b.to(tl.int64) * stride_vb + hk * stride_vh
        o_base = Out + b.to(tl.int64) * stride_ob + h * stride_oh

    # The dot's input precision: true fp32 for fp32 inputs (as torch's matmul), native otherwise.
    PREC: tl.constexpr = "ieee" if IS_FP32 or INTERP else "tf32"
    qk_scale = sm_scale * 1.4426950408889634

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen_q
    offs_d0 = tl.arange(0, D0)
    d0_ok = offs_d0 < D_REAL
    q0 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d0[None, :] * stride_qd,
                 mask=m_ok[:, None] & d0_ok[None, :], other=0.0)
    if D1 > 0:
        offs_d1 = D0 + tl.arange(0, D1)
        q1 = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d1[None, :] * stride_qd,
                     mask=m_ok[:, None], other=0.0)
    if INTERP:
        # The interpreter computes low-precision tl.dot wrongly (triton issue 11584): use fp32 operands.
        q0 = q0.to(tl.float32)
        if D1 > 0:
            q1 = q1.to(tl.float32)

    if HAS_BIAS:
        # rel_h / rel_w may be stored (B, H, k, N) (stride_rhm == 1): then every load below is coalesced.
        rh_vec = REL_H + b.to(tl.int64) * stride_rhb + h * stride_rhh + offs_m * stride_rhm
        rh_base = rh_vec[:, None]
        rw_base = REL_W + b.to(tl.int64) * stride_rwb + h * stride_rwh + offs_m[:, None] * stride_rwm
        tiles_per_row = KW // tile_w
        per_tile = tile_h * tile_w
        if BIAS_MODE == 1:
            subs_w = tile_w // TW
            if W_HOIST:
                # The key tile spans whole grid rows, so its rel_w slice is the same every step.
                bias_w_rows = tl.load(rw_base + tl.arange(0, TW)[None, :] * stride_rwk, mask=m_ok[:, None], other=0.0)
                bias_w_rows = bias_w_rows.to(tl.float32) * 1.4426950408889634
                if USE_WDOT:
                    # rel_w @ I adds rel_w to every score inside the MMA. That frees the registers the
                    # fp32 rel_w tile holds, which 128-row tiles need (docs/benchmarks.md, run 6).
                    # Rounding rel_w to the input dtype matches SAM's own bf16 bias.
                    bias_w_lp = bias_w_rows.to(Q.dtype.element_ty)
                    eye = tl.arange(0, TW)[:, None] == tl.arange(0, BLOCK_N)[None, :]
                    if INTERP:  # fp32 operands (issue 11584 above); the interpreter's bool -> bf16 is wrong too
                        bias_w_lp = bias_w_lp.to(tl.float32)
                        eye = eye.to(tl.float32)
                    else:
                        eye = eye.to(Q.dtype.element_ty)
        if BIAS_MODE == 2:
            # Whole rel_h / rel_w rows of this program's queries, pre-multiplied into the exp2 domain.
            kh_r = tl.arange(0, KH_P)
            kw_r = tl.arange(0, KW_P)
            rel_h_rows = tl.load(rh_base + kh_r[None, :] * stride_rhk, mask=m_ok[:, None] & (kh_r[None, :] < KH), other=0.0)
            rel_w_rows = tl.load(rw_base + kw_r[None, :] * stride_rwk, mask=m_ok[:, None] & (kw_r[None, :] < KW), other=0.0)
            rel_h_rows = rel_h_rows.to(tl.float32) * 1.4426950408889634
            rel_w_rows = rel_w_rows.to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if D1 > 0:
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)

    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_N
    if HAS_MASK:
        q_block = (pid_m * BLOCK_M) // MASK_BLOCK
        n_steps = tl.load(KV_NUM + b * stride_numb + h * stride_numh + q_block * stride_numm) * SUBS
        idx_base = KV_IDX + b * stride_idxb + h * stride_idxh + q_block * stride_idxm
    else:
        n_steps = tl.cdiv(seqlen_k, BLOCK_N)

    offs_nb = tl.arange(0, BLOCK_N)
    for step in range(0, n_steps):
        if HAS_MASK:
            start_n = tl.load(idx_base + step // SUBS) * MASK_BLOCK + (step % SUBS) * BLOCK_N
        else:
            start_n = step * BLOCK_N
        offs_n = start_n + offs_nb
        n_ok = offs_n < seqlen_k

        k0 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d0[:, None] * stride_kd,
                     mask=n_ok[None, :] & d0_ok[:, None], other=0.0)
        if INTERP:
            k0 = k0.to(tl.float32)
        qk = tl.dot(q0, k0, input_precision=PREC)
        if D1 > 0:
            k1 = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d1[:, None] * stride_kd,
                         mask=n_ok[None, :], other=0.0)
            if INTERP:
                k1 = k1.to(tl.float32)
            qk = tl.dot(q1, k1, qk, input_precision=PREC)
        qk = qk * qk_scale

        row_off = tl.zeros([BLOCK_M], dtype=tl.float32)
        if BIAS_MODE == 1:
            n_tile = start_n // per_tile
            sub = (start_n % per_tile) // BLOCK_N
            row0 = (n_tile // tiles_per_row) * tile_h + (sub // subs_w) * TH
            col0 = (n_tile % tiles_per_row) * tile_w + (sub % subs_w) * TW
            if USE_WDOT:
                qk = tl.dot(bias_w_lp, eye, qk)
            elif W_HOIST:
                bias_w = bias_w_rows
            else:
                bias_w = tl.load(rw_base + (col0 + tl.arange(0, TW)[None, :]) * stride_rwk, mask=m_ok[:, None], other=0.0)
                bias_w = bias_w.to(tl.float32) * 1.4426950408889634
            if TH == 1:
                # One grid row: rel_h is one value per query row. It shifts the whole row, so it goes
                # into the running max instead of into every score (one FMA per score, as without bias).
                if not USE_WDOT:
                    qk += bias_w
                row_off = tl.load(rh_vec + row0 * stride_rhk, mask=m_ok, other=0.0).to(tl.float32) * 1.4426950408889634
            else:
                bias_h = tl.load(rh_base + (row0 + tl.arange(0, TH)[None, :]) * stride_rhk, mask=m_ok[:, None], other=0.0)
                bias_h = bias_h.to(tl.float32) * 1.4426950408889634
                qk += tl.reshape(bias_h[:, :, None] + bias_w[:, None, :], (BLOCK_M, BLOCK_N))
        elif BIAS_MODE > 1:
            n_tile = offs_n // per_tile
            inner = offs_n % per_tile
            key_row = (n_tile // tiles_per_row) * tile_h + inner // tile_w
            key_col = (n_tile % tiles_per_row) * tile_w + inner % tile_w
            if BIAS_MODE == 2:
                hot_h = (tl.arange(0, KH_P)[:, None] == key_row[None, :]).to(tl.float32)
                hot_w = (tl.arange(0, KW_P)[:, None] == key_col[None, :]).to(tl.float32)
                qk = tl.dot(rel_h_rows, hot_h, qk, input_precision=PREC)
                qk = tl.dot(rel_w_rows, hot_w, qk, input_precision=PREC)
            else:
                ok = m_ok[:, None] & n_ok[None, :]
                bias_h = tl.load(rh_base + key_row[None, :] * stride_rhk, mask=ok, other=0.0).to(tl.float32)
                bias_w = tl.load(rw_base + key_col[None, :] * stride_rwk, mask=ok, other=0.0).to(tl.float32)
                qk += (bias_h + bias_w) * 1.4426950408889634

        if not EVEN_N:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1) + row_off)
        # A row that has seen only -inf so far keeps m = -inf; subtracting 0 then gives exp2 = 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - (m_use - row_off)[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

        v0 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d0[None, :] * stride_vd,
                     mask=n_ok[:, None] & d0_ok[None, :], other=0.0)
        # P is rounded to the input dtype before the PV product, as on the GPU.
        p_lp = p.to(v0.dtype)
        if INTERP:
            p_lp = p_lp.to(tl.float32)
            v0 = v0.to(tl.float32)
        acc0 = tl.dot(p_lp, v0, acc0 * alpha[:, None], input_precision=PREC)
        if D1 > 0:
            v1 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd,
                         mask=n_ok[:, None], other=0.0)
            if INTERP:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(p_lp, v1, acc1 * alpha[:, None], input_precision=PREC)

    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    o_ptrs = o_base + offs_m[:, None] * stride_on
    tl.store(o_ptrs + offs_d0[None, :] * stride_od, (acc0 * inv_l[:, None]).to(Out.dtype.element_ty),
             mask=m_ok[:, None] & d0_ok[None, :])
    if D1 > 0:
        tl.store(o_ptrs + offs_d1[None, :] * stride_od, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=m_ok[:, None])


_HEURISTICS = {
    "BIAS_MODE": _bias_mode,
    "TH": _rect_th,
    "TW": _rect_tw,
    "W_HOIST": lambda a: _rect_tw(a) == a["tile_w"] == a["KW"],
    "USE_WDOT": lambda a: bool(a["W_DOT"]) and _bias_mode(a) == 1 and _wdot_applies(a, a["BLOCK_N"]),
    "KH_P": lambda a: max(16, _next_pow2(a["KH"])),
    "KW_P": lambda a: max(16, _next_pow2(a["KW"])),
    "EVEN_N": lambda a: (not a["VARLEN"]) and a["seqlen_k"] % a["BLOCK_N"] == 0,
}
_attn_fwd_heur = triton.heuristics(_HEURISTICS)(_attn_fwd)


def _configs():
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (16, 32, 64, 128):
            warps = 8 if bm * bn >= 128 * 64 else 4
            for stages in (2, 3):
                for w_dot in (0, 1):
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "W_DOT": w_dot},
                                             num_warps=warps, num_stages=stages))
    return out


def _prune(configs, named_args, **kwargs):
    """Keep configs that fit the problem: tiles inside one mask block, not far larger than the sequences.

    For long sequences that leaves 64/128-row tiles (8 configs), for SAM's few-token decoder sides the
    16-row ones: tuning compiles each kept config once per shape class.
    """
    a = {**named_args, **kwargs}
    mb = a["MASK_BLOCK"]
    max_m = max(16, min(128, _next_pow2(a["seqlen_q"])))
    max_n = max(16, min(128, _next_pow2(a["seqlen_k"])))
    d = a["D0"] + a["D1"]
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if mb % bm or mb % bn or bm > max_m or bn > max_n or bm < min(64, max_m) or bn < min(64, max_n):
            continue
        if (d > 128 or a["IS_FP32"]) and bm * bn > 64 * 64:
            continue
        if c.kwargs["W_DOT"] and not _wdot_applies(a, bn):
            continue  # it would compile a twin of the W_DOT=0 config
        keep.append(c)
    return keep or [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "W_DOT": 0}, num_warps=4, num_stages=1)]


_TUNE_KEY = ["seqlen_q", "seqlen_k", "batch", "num_heads", "KH", "KW", "tile_h", "tile_w", "D0", "D1", "MASK_BLOCK",
             "HAS_MASK", "HAS_BIAS", "VARLEN", "IS_FP32"]
_attn_fwd_tuned = triton.autotune(
    configs=_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune}
)(_attn_fwd_heur)


def _fixed_config(named_args) -> dict:
    """One sensible config: used by the interpreter and when SAM_SPARSE_AUTOTUNE=0."""
    mb = named_args["MASK_BLOCK"]
    bm = min(64, mb, max(16, _next_pow2(named_args["seqlen_q"])))
    bn = min(64, mb, max(16, _next_pow2(named_args["seqlen_k"])))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "W_DOT": 0, "num_warps": 4, "num_stages": 2}


def _strides(t: Optional[torch.Tensor], n: int, broadcast_first: int = 0):
    if t is None:
        return (0,) * n
    s = list(t.stride())[:n]
    for i in range(broadcast_first):
        if t.shape[i] == 1:
            s[i] = 0  # a size-1 dim of a broadcast mask is shared by every batch / head
    return tuple(s)


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: Optional[torch.Tensor],
    kv_indices: Optional[torch.Tensor],
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
    key_tile: Optional[Tuple[int, int]],
    softmax_scale: float,
    block_size: int,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """Launch the kernel on validated inputs (interface.py checks them).

    q: (B, Nq, H, D) or varlen (total_q, H, D); k, v: (B, Nk, Hk, D) or (total_k, Hk, D).
    kv_num_blocks: int32 (Bm, Hm, QB); kv_indices: int32 (Bm, Hm, QB, KB) (interface.block_lists), or None.
    rel_h (B, H, Nq, kh), rel_w (B, H, Nq, kw) or None; key_tile (th, tw) or None (raster).
    out: optional preallocated output shaped and typed like q (tests poison it to catch unwritten rows).
    config: optional fixed launch config {BLOCK_M, BLOCK_N, num_warps, num_stages[, W_DOT]}: skips autotuning.
    Returns out.
    """
    varlen = cu_seqlens_q is not None
    if varlen:
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = int(max_seqlen_q), k.shape[0]
    else:
        q4, k4, v4 = q, k, v
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
    nheads, head_dim = q.shape[-2], q.shape[-1]
    kv_group = nheads // k.shape[-2]
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    o4 = out.unsqueeze(0) if varlen else out
    d0, d1 = _split_head_dim(head_dim)

    has_bias = rel_h is not None
    kh, kw = (rel_h.shape[-1], rel_w.shape[-1]) if has_bias else (1, 1)
    tile_h, tile_w = key_tile if key_tile is not None else (kh, kw)
    dummy = q  # never read when the matching flag is off
    has_mask = kv_num_blocks is not None
    args = dict(
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, batch=batch, num_heads=nheads, kv_group=kv_group,
        KH=kh, KW=kw, tile_h=tile_h, tile_w=tile_w,
        D_REAL=head_dim, D0=d0, D1=d1, MASK_BLOCK=block_size,
        HAS_MASK=has_mask, HAS_BIAS=has_bias, VARLEN=varlen,
        IS_FP32=q.dtype == torch.float32, INTERP=INTERPRET,
    )
    if varlen:
        # seqlen_k only sizes the tuning key in varlen mode; the kernel reads each sequence's own length.
        args["seqlen_k"] = max(seqlen_k, 1)
    tensors = (
        q4, k4, v4, o4,
        kv_num_blocks if has_mask else dummy, kv_indices if has_mask else dummy,
        rel_h if has_bias else dummy, rel_w if has_bias else dummy,
        cu_seqlens_q if varlen else dummy, cu_seqlens_k if varlen else dummy,
        float(softmax_scale),
    )
    strides = (
        *q4.stride(), *k4.stride(), *v4.stride(), *o4.stride(),
        *_strides(kv_num_blocks, 3, 2), *_strides(kv_indices, 3, 2),
        *_strides(rel_h, 4), *_strides(rel_w, 4),
    )

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)

    if config is not None or INTERPRET or os.environ.get("SAM_SPARSE_AUTOTUNE") == "0":
        cfg = {"W_DOT": 0, **(config or _fixed_config(args))}
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        if block_size % bm or block_size % bn or min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
            raise ValueError(f"config {cfg}: BLOCK_M and BLOCK_N must be powers of two >= 16 dividing block_size={block_size}")
        _attn_fwd_heur[grid({"BLOCK_M": cfg["BLOCK_M"]})](*tensors, *strides, **args, **cfg)
    else:
        _attn_fwd_tuned[grid](*tensors, *strides, **args)
    return out
