"""Triton kernel for rotary position encoding applied in place, and its launcher.

Every token's head vector is taken as D/2 complex numbers (x[2i] + i x[2i+1]) and multiplied by the unit
vectors (cos[p, i] + i sin[p, i]) of its table row p: (a c - b s, a s + b c), in float32, stored back in
x's dtype. One program takes BLOCK_N tokens of one (batch, head): it reads each token's D values once
and writes them once, where a complex float32 version (SAM 2's apply_rotary_enc) reads and writes float32
and complex copies several times, and gathers and scatters the keys it rotates (12x faster at 16 objects'
memory, docs/benchmarks.md run 54).
Tokens whose table row is negative are left as they are (SAM 2's object-pointer tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_util import INTERPRET, MAX_GRID_Y, next_pow2  # noqa: F401  (INTERPRET: tests check the mode)


@triton.jit(do_not_specialize=("n_tok", "n_table", "n_bh"))
def _rotary_kernel(
    X, COS, SIN, POS,
    n_heads, n_tok, n_table, n_bh,
    stride_xb, stride_xh, stride_xn,
    HALF: tl.constexpr, HALF_P: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if pid_bh >= n_bh:
        return
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_tok
    if HAS_POS:
        rows = tl.load(POS + offs_n, mask=n_ok, other=-1)
    else:
        rows = offs_n % n_table  # a table repeated along the sequence
    tok_ok = n_ok & (rows >= 0)
    i = tl.arange(0, HALF_P)
    tab_ok = tok_ok[:, None] & (i < HALF)[None, :]
    c = tl.load(COS + rows[:, None] * HALF + i[None, :], mask=tab_ok, other=1.0)
    s = tl.load(SIN + rows[:, None] * HALF + i[None, :], mask=tab_ok, other=0.0)
    cols = tl.arange(0, 2 * HALF_P)
    ptrs = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + offs_n.to(tl.int64)[:, None] * stride_xn
    x_ok = tok_ok[:, None] & (cols < 2 * HALF)[None, :]
    x = tl.load(ptrs + cols[None, :], mask=x_ok, other=0.0).to(tl.float32)
    re, im = tl.split(tl.reshape(x, (BLOCK_N, HALF_P, 2)))
    out = tl.reshape(tl.join(re * c - im * s, re * s + im * c), (BLOCK_N, 2 * HALF_P))
    tl.store(ptrs + cols[None, :], out.to(X.dtype.element_ty), mask=x_ok)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor]) -> None:
    """x (B, H, N, D) rotated in place; cos, sin (T, D/2) float32 contiguous; positions int32 (N,) or None
    (token n uses row n % T). Inputs are checked by rotary.py."""
    B, H, N, D = x.shape
    if x.numel() == 0:
        return
    half_p = next_pow2(D // 2)
    block_n = max(1, min(64, 4096 // (2 * half_p), next_pow2(N)))  # ~4K elements per program
    n_bh = B * H
    grid = (triton.cdiv(N, block_n), min(n_bh, MAX_GRID_Y), triton.cdiv(n_bh, MAX_GRID_Y))
    _rotary_kernel[grid](
        x, cos, sin, positions if positions is not None else cos,
        H, N, cos.shape[0], n_bh, x.stride(0), x.stride(1), x.stride(2),
        HALF=D // 2, HALF_P=half_p, HAS_POS=positions is not None, BLOCK_N=block_n, num_warps=4,
    )
