"""Triton kernel behind block_mass.block_attention_mass on CUDA: per-block softmax mass in two passes.

One program takes BLOCK_M query rows of one (batch, head) and walks every key tile of BLOCK_N keys,
recomputing the logits q.k * scale + rel_h[i, row(j)] + rel_w[i, col(j)] (exp2 domain, fp32):
  pass 1 (MASS=False): online max and sum over all keys -> lse[i] = log2(sum_j 2^s[i, j]);
  pass 2 (MASS=True):  sum over the tile of 2^(s - lse), one float per (query tile, key tile).
The tiles divide block_size, so a torch sum over the tiles of each block gives the block mass. No
atomics: every (query tile, key tile) sum has its own slot, so the result is deterministic.

The bias is gathered element-wise (the general path of triton_attn's kernel): simple and right for
every key order; calibration is offline, so this kernel is not tuned.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .triton_util import INTERPRET, dot_precision, next_pow2


@triton.jit
def _mass_kernel(
    Q, K, REL_H, REL_W, LSE, PART,
    sm_scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_rhb, stride_rhh, stride_rhm, stride_rhk,
    stride_rwb, stride_rwh, stride_rwm, stride_rwk,
    seqlen_q, seqlen_k, num_heads, kv_group,
    KW, tile_h, tile_w, part_m, part_n,
    D: tl.constexpr, D_P: tl.constexpr, HAS_BIAS: tl.constexpr, MASS: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // kv_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen_q
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if INTERP:  # the interpreter computes low-precision tl.dot wrongly (triton issue 11584)
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk * stride_kh
    rh_base = REL_H + b.to(tl.int64) * stride_rhb + h * stride_rhh + offs_m[:, None] * stride_rhm
    rw_base = REL_W + b.to(tl.int64) * stride_rwb + h * stride_rwh + offs_m[:, None] * stride_rwm
    lse_ptr = LSE + pid_bh.to(tl.int64) * seqlen_q + offs_m
    part_ptr = PART + (pid_bh.to(tl.int64) * part_m + pid_m) * part_n
    qk_scale = sm_scale * LOG2E

    if MASS:
        # Rows past seqlen_q (and rows with no key) read +inf: 2^(s - inf) = 0, they add nothing.
        lse = tl.load(lse_ptr, mask=m_ok, other=float("inf"))
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if INTERP:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        if HAS_BIAS:
            # (row, col) of each key on the kh x kw grid: tiles of tile_h x tile_w in raster order.
            per_tile = tile_h * tile_w
            tile = offs_n // per_tile
            inner = offs_n % per_tile
            key_row = (tile // (KW // tile_w)) * tile_h + inner // tile_w
            key_col = (tile % (KW // tile_w)) * tile_w + inner % tile_w
            ok = m_ok[:, None] & n_ok[None, :]
            bias_h = tl.load(rh_base + key_row[None, :] * stride_rhk, mask=ok, other=0.0).to(tl.float32)
            bias_w = tl.load(rw_base + key_col[None, :] * stride_rwk, mask=ok, other=0.0).to(tl.float32)
            s += (bias_h + bias_w) * LOG2E
        s = tl.where(n_ok[None, :], s, float("-inf"))
        if MASS:
            p = tl.math.exp2(s - lse[:, None])
            tl.store(part_ptr + start_n // BLOCK_N, tl.sum(tl.sum(p, 1), 0))
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only -inf keeps m = -inf; subtracting 0 then gives 2^-inf = 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(s - m_use[:, None]), 1)
            m_i = m_new

    if not MASS:
        # A row with no key gets lse = +inf, so that pass 2 gives it 0 everywhere.
        lse = m_i + tl.math.log2(tl.where(l_i > 0, l_i, 1.0))
        tl.store(lse_ptr, tl.where(l_i > 0, lse, float("inf")), mask=m_ok)


def _default_tiles(head_dim: int, block_size: int) -> tuple:
    t = 64 if next_pow2(head_dim) <= 128 else 32  # wide heads: smaller tiles keep q and k in registers
    return min(t, block_size), min(t, block_size)


def mass_triton(q, k, rel_h, rel_w, key_tile, softmax_scale: float, block_size: int, tiles=None) -> torch.Tensor:
    """block_attention_mass on the Triton kernel (inputs validated there, seqlens > 0). float32 result.

    q: (B, Nq, H, D); k: (B, Nk, Hk, D); rel_h (B, H, Nq, kh), rel_w (B, H, Nq, kw) or None; key_tile
    (th, tw) or None (raster). tiles: (BLOCK_M, BLOCK_N), powers of two >= 16 dividing block_size
    (tests use it to put several tiles in a block); default 64 x 64 (32 x 32 for headdim > 128).
    Returns (B, H, QB, KB). Extra memory: B*H*Nq floats (lse) + B*H*Nq*Nk / (BLOCK_M*BLOCK_N) floats.
    """
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    bs = block_size
    bm, bn = tiles if tiles is not None else _default_tiles(D, bs)
    if bs % bm or bs % bn or min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"tiles={(bm, bn)}: expected powers of two >= 16 dividing block_size={bs}")
    qb, kb = -(-Nq // bs), -(-Nk // bs)
    lse = torch.empty(B * H, Nq, dtype=torch.float32, device=q.device)
    part = torch.zeros(B * H, qb * (bs // bm), kb * (bs // bn), dtype=torch.float32, device=q.device)
    has_bias = rel_h is not None
    kh, kw = (rel_h.shape[-1], rel_w.shape[-1]) if has_bias else (1, 1)
    th, tw = key_tile if key_tile is not None else (kh, kw)
    rel_strides = (*rel_h.stride(), *rel_w.stride()) if has_bias else (0,) * 8
    args = (
        q, k, rel_h if has_bias else q, rel_w if has_bias else q, lse, part,  # q stands in for absent tensors
        float(softmax_scale), *q.stride(), *k.stride(), *rel_strides,
        Nq, Nk, H, H // k.shape[2], kw, th, tw, part.shape[1], part.shape[2],
    )
    grid = (triton.cdiv(Nq, bm), B * H)
    for mass in (False, True):
        _mass_kernel[grid](*args, D=D, D_P=max(16, next_pow2(D)), HAS_BIAS=has_bias, MASS=mass,
                           DOT_PREC=dot_precision(q.dtype), INTERP=INTERPRET, BLOCK_M=bm, BLOCK_N=bn,
                           num_warps=4, num_stages=2)
    return part.view(B, H, qb, bs // bm, kb, bs // bn).sum(dim=(3, 5))
