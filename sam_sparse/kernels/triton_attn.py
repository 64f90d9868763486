"""Triton forward kernel for block-sparse attention with a fused decomposed 2-D relative-position bias,
and its launcher: plan once per input signature, launch many.

One program computes BLOCK_M query rows of one (batch, head) and walks only the key blocks its layout
row lists (kv_num_blocks / kv_indices, as FlexAttention), with an fp32 online softmax (exp2 domain).
Steps past seqlen_k are never taken: the listed blocks are in ascending order, so the kernel counts the
key tiles that hold keys and stops there (a partial last block costs only its real keys).

The bias rel_h[i, row(j)] + rel_w[i, col(j)] is formed per key tile in registers, one of three ways
(BIAS_RECT / BIAS_ONEHOT / BIAS_GATHER, picked per config by _bias_path):
  rect:    the key tile is a RECT_H x RECT_W rectangle of the key grid, so the bias is a (BLOCK_M, RECT_H) slice
           of rel_h broadcast against a (BLOCK_M, RECT_W) slice of rel_w: no gather at all. When the
           tile is one grid row (SAM's raster 64 x 64 grid with 64-key tiles), rel_w is loaded once
           per program and rel_h, one value per query row, is folded into the running max. rel_w
           is then either added to the scores (W_DOT=0) or, in bf16, accumulated into them by the
           tensor cores as rel_w @ I (W_DOT=1); the tuner keeps whichever is faster.
  onehot:  small grids (windows, 14 x 14): rel_h / rel_w rows are loaded once per program and
           expanded with one-hot matrices on the tensor cores.
  gather:  anything else: an element-wise gather from L1/L2 (slow, always correct).
A -inf in rel_h / rel_w excludes that key, on every path (the MMA paths carry it as a huge finite
value, NEG_BIG, since -inf * 0 would be NaN; a key so scored gets probability 0, and a row that has
seen only such keys gets 0 everywhere). Scores stay in q.k units inside the loop, the biases divided by
softmax_scale once per program, so the scale costs one FMA per score inside exp2's argument. The key
grid's geometry (KH, KW, TILE_H, TILE_W) is constexpr: with run-time values, locating each key tile's
rel_h row took three integer divisions per step, a quarter more instructions (docs/benchmarks.md).

Shapes: q (B, Nq, H, D) or varlen (total_q, H, D); k (B, Nk, Hk, D) or (total_k, Hk, D); v likewise with a head
dim of its own, DV (V's and the output's columns are chunked as q / k's: DV0, DV1, DV1_AT); any strides.
Head dims are split into two power-of-two parts when possible (80 = 64 + 16, 96 = 64 + 32) instead of
padding to the next power of two, which would waste 60% more tensor-core work at vit_h's 80; else
(OVERLAP_SECOND_CHUNK) into two that overlap: 72 runs as columns 0-63 and 56-71. Row strides
reach the kernel divided by ALIGN (_address_align), so that rows of head dim 56 or 72, whose strides Triton
would not know to be 16-byte multiples, still load in 16-byte vectors.

WINDOW mode (window_attn): q, k, v are (B, GH, GW, H, D) token grids and each program's sequence is
one WIN_H x WIN_W window, its tokens found by index arithmetic on the grid (no partition copy); the
output is written to the grid in place. The queries may lie on a grid of their own (a q pooled by 2, as
Hiera's first block of a stage), cut into QWIN_H x QWIN_W windows: query window (i, j) attends to key
window (i, j). Windows inside the grid and windows that overhang it run as two
launches (WIN_PAD): only the latter carry the padding keys, whose key and value are K_PAD / V_PAD. Without a
block mask or rel-pos terms (which index a window's raster order) the overhanging windows are cropped to the
grid (CROP): their tokens on the grid in raster order of the cropped rectangle, the padding keys as one key of
weight n_pad, so a 14 x 14 window cut to 14 x 8 takes two 64-row tiles and two key steps instead of four each.
A window's keys that end in a partial step (a 14 x 14 window's 196) take it as a narrow TAIL_N-key tile after the
loop, loaded before it, in 16 bits up to head dim 128, where nothing indexes the key tiles (TAIL_KEYS).
Windows of few tokens (Hiera's 4 x 4 and its pooled ones; at most 32 queries) may be packed (a config's PACK):
one program takes PACK windows side by side as one QWIN_H x (PACK * QWIN_W) tile of queries against the
WIN_H x (PACK * WIN_W) rectangle of their keys, a query seeing only its own window's keys (block-diagonal),
so that the tensor cores get 64-row tiles instead of 16-row ones, at PACK times the MMA work.

Hopper: a config with TMA=1 reads K and V through host-side tensor descriptors (the copy engine; zero
fill past the sequence, or past the grid) instead of pointer loads, in WINDOW mode where a key tile is whole
window rows (key_box); the tuner keeps it where it measured faster. Nothing outside a wgmma may write its
accumulator registers while one can be in flight (a tile rewritten in registers between two of them, a product
after the loop beside its rescaling): ptxas then serializes every wgmma of the kernel (warning C7515), which cost
hiera_l's layers 3-8% (docs/benchmarks.md, runs 122-124); scripts/kernel_report.py reports it per layer.

Lengths and counts that change from call to call (seqlen_q / seqlen_k, the (sequence, head) count, the
block mask's strides) are run-time scalars Triton does not specialize on (RUNTIME_SCALARS): a video memory
growing by a frame per call reuses the compiled kernel of its length bucket, and is tuned once per bucket.
Head dim 256 (SAM 2's memory attention) also gets 128-row tiles over 8 warps (WIDE_HEAD_CONFIGS).

Split-KV (a config's SPLIT_K, as flash-decoding): when a call's query tiles leave SMs idle (one object's
memory attention: 32 tiles of 128 queries on an H200's 132 SMs), SPLIT_K programs share each tile's key steps,
write fp32 partial outputs and row log-sum-exps to a workspace, and _split_combine merges them into the
output. The tuner tries each config split ("fill": as many splits as fill the SMs once) beside it unsplit.

float32 inputs follow torch.get_float32_matmul_precision(), as torch's own matmuls: "highest" runs
3xTF32 on the tensor cores (float32-level error, see docs/benchmarks.md), "high" / "medium" TF32.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .layout import length_bucket
from .triton_util import INTERPRET, MAX_GRID_Y, dot_precision, next_pow2

try:  # Triton's async-compile mode (parallel_compiles), where this Triton has it
    from triton.runtime import _async_compile
    from triton.runtime._async_compile import FutureKernel as _FutureKernel
except ImportError:
    _async_compile = _FutureKernel = None

try:  # Triton >= 3.4: host-side TMA descriptors (the Hopper path)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

BIAS_NONE, BIAS_RECT, BIAS_ONEHOT, BIAS_GATHER = 0, 1, 2, 3


# Head dims such as 72 (hiera_l) as two chunks where the second ends at the last column and overlaps the
# first (72 = columns 0-63 + columns 56-71) instead of one chunk of the next power of two (128, 56 columns
# masked: 78% more tensor-core work than 72). The overlapping chunk has no column to mask off: its K / V
# loads are those of an exact split (80 = 64 + 16) from another column, and the shared columns are zeroed
# once in q. An earlier form, a second chunk with its columns past d masked on load, passed every
# interpreter test and gave wrong results on an H200 (docs/benchmarks.md, run 34); this one passed the GPU
# tests (run 63) and runs hiera_l's layers 1.2-1.4x faster (4 x 4 windows: 0.8x). False gives the padded
# chunk back (tests and benchmarks compare the two). Read when a plan is made (plans are cached per input
# signature).
OVERLAP_SECOND_CHUNK = True


def head_dim_chunks(d: int) -> Tuple[int, int, int]:
    """(D0, D1, D1_AT): a power-of-two chunk of columns [0, D0) and one of [D1_AT, D1_AT + D1) (D1 may be 0).

    Exact when possible (80 = 64 + 16, 96 = 64 + 32: D1_AT = D0). Else, with OVERLAP_SECOND_CHUNK, a second
    chunk ending at column d (72: D1 = 16 from column 56), where that is less work than the padded chunk;
    else one chunk of the next power of two with the columns past d masked on load and store (56 -> 64,
    72 -> 128)."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    if rest == 0 or (rest >= 16 and rest & (rest - 1) == 0):
        return d0, rest, d0
    d1 = max(16, next_pow2(rest))
    if OVERLAP_SECOND_CHUNK and d0 + d1 < next_pow2(d):
        return d0, d1, d - d1
    return next_pow2(d), 0, next_pow2(d)


# Whether the tuner runs packed windows (_pack_configs) where they apply, instead of tuning one window per program.
# False gives the unpacked tuning back (benchmarks compare the two). Read when a plan is made.
PACK_WINDOWS = True
# Whether the launch of windows that overhang the grid crops them to it (the kernel's CROP: their tokens on the grid
# in raster order, padding keys as one weighted key) where no block mask or rel-pos terms index the window's raster
# order. False gives the padded tiles back (benchmarks compare the two). Read when a plan is made.
CROP_WINDOWS = True
# Windows of at most this many tokens (and query tiles) are cropped: _divmod_small's exact range.
CROP_MAX_TOKENS = 2**16 - 256
# Whether windows whose keys end in a partial tile take that tile as a narrower one after the loop (the kernel's
# TAIL_N), in 16 bits up to head dim 128, where nothing indexes the keys' tiles (no block mask, rel-pos terms, TMA
# boxes, padding keys or packed windows). Only windows: their key count is exact in the tuning key, so the tail's
# shared memory (loaded before the loop, it stays there through it) is in every timed candidate; a sequence's
# length varies inside its tuning class. False gives the masked full last step back (benchmarks compare the two).
TAIL_KEYS = True


# Tests set this to BIAS_ONEHOT or BIAS_GATHER to exercise a path the tuner would not pick on their shapes.
FORCE_BIAS_PATH: Optional[int] = None


def _rect_tile(block_n: int, tile_w: int) -> Tuple[int, int]:
    """(RECT_H, RECT_W) of a BLOCK_N-key rectangle when keys come in rows of tile_w."""
    tw = min(tile_w, block_n)
    return block_n // tw, tw


def _bias_path(a: dict, block_n: int) -> int:
    if not a["HAS_BIAS"]:
        return BIAS_NONE
    if FORCE_BIAS_PATH is not None:
        return FORCE_BIAS_PATH
    th, tw = _rect_tile(block_n, a["tile_w"])
    pow2 = lambda x: x & (x - 1) == 0  # noqa: E731
    if pow2(tw) and pow2(th) and th * tw == block_n and a["tile_w"] % tw == 0 and a["tile_h"] % th == 0:
        return BIAS_RECT
    if next_pow2(a["KH"]) <= 64 and next_pow2(a["KW"]) <= 64:
        return BIAS_ONEHOT
    return BIAS_GATHER


def _wdot_applies(a: dict, block_n: int) -> bool:
    """rel_w @ I changes the code only where rel_w is hoisted for one grid row, and only in bf16: bf16
    holds the huge finite stand-in for -inf (fp16 does not), and fp32 has no cheaper MMA."""
    return a["HAS_BIAS"] and a["IS_BF16"] and block_n == a["tile_w"] == a["KW"]


@triton.jit
def _key_start(step, idx_base, valid, HAS_MASK: tl.constexpr, SUBS: tl.constexpr, MASK_BLOCK: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The first key of loop step `step`: the step-th key tile of the listed blocks, or of all keys."""
    if HAS_MASK:
        return tl.load(idx_base + step // SUBS, mask=valid, other=0) * MASK_BLOCK + (step % SUBS) * BLOCK_N
    else:
        return step * BLOCK_N


@triton.jit
def _rect_row(start_n, PER_TILE: tl.constexpr, TILES_PER_ROW: tl.constexpr, TILE_H: tl.constexpr,
              SUBS_W: tl.constexpr, BLOCK_N: tl.constexpr, RECT_H: tl.constexpr):
    """The first key-grid row of the RECT_H x RECT_W key tile that starts at key start_n. The key grid's
    geometry is constexpr: with run-time divisors these three divisions cost the softmax loop a quarter
    more instructions per step (docs/benchmarks.md, run 28)."""
    n_tile = start_n // PER_TILE
    sub = (start_n % PER_TILE) // BLOCK_N
    return (n_tile // TILES_PER_ROW) * TILE_H + (sub // SUBS_W) * RECT_H


@triton.jit
def _online_softmax(qk, m_i, l_i, qk_scale, row_off, dead_max):
    """One key tile's step of the online softmax. qk (BLOCK_M, n) fp32 scores in q.k units; m_i, l_i (BLOCK_M,) the
    running max (log2 units: scaled by qk_scale = softmax_scale * log2(e), row_off included) and sum; row_off
    (BLOCK_M,) a per-row logit offset already in log2 units (rel_h folded out of the scores, else 0); dead_max the
    max (log2 units) at or below which a row has no key yet. Returns p (BLOCK_M, n), the tile's probabilities
    against the new max, alpha (BLOCK_M,), the factor for what came before, and the new m_i, l_i."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale + row_off)
    # A row with only -inf / NEG_BIG keys so far subtracts +inf: exp2 gives 0 for each, rather than NaN
    # (-inf - -inf), or overflow (at NEG_BIG's scale, one rounding of the FMA is worth 2**100).
    m_use = tl.where(m_new <= dead_max, float("inf"), m_new)
    p = tl.math.exp2(qk * qk_scale - (m_use - row_off)[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _grid_keys(ky, kx, ok, grid_h, grid_w, stride_kn, stride_kx, stride_vn, stride_vx):
    """Window keys at grid cells (ky, kx), each (n,): which of the `ok` ones lie on the grid, and their K and V
    row offsets (elements, the strides as the kernel has them)."""
    on = ok & (ky < grid_h) & (kx < grid_w)
    return on, ky * stride_kn + kx * stride_kx, ky * stride_vn + kx * stride_vx


@triton.jit
def _divmod_small(n, d, inv_d):
    """n // d and n % d for int32 0 <= n < 2**16 and a run-time d >= 1 (inv_d = 1 / d in fp32, within 2 ulp),
    through one float multiply: (n + 0.5) / d lies at least 0.5 / d from an integer, far beyond the product's
    rounding there (make_plan crops only windows of fewer than CROP_MAX_TOKENS tokens, tiles included). An integer
    division by a run-time value costs a cropped window's key step about 150 more instructions."""
    quo = ((n.to(tl.float32) + 0.5) * inv_d).to(tl.int32)
    return quo, n - quo * d


@triton.jit
def _tma_tile(DESC, img, start_n, hk, col, y0, x0, WINDOW: tl.constexpr, WIN_W: tl.constexpr, BLOCK_N: tl.constexpr,
              WIDTH: tl.constexpr):
    """(BLOCK_N, WIDTH): keys start_n.. of K or V through a TMA descriptor (tma_descriptors), columns col..:
    of a sequence (B, N, Hk, D), or in WINDOW mode BLOCK_N / WIN_W whole rows of the window whose top-left key
    is (y0, x0) on the (B, GH, GW, Hk, D) key grid. Keys past the bounds arrive as zeros."""
    if WINDOW:
        t = DESC.load([img, y0 + start_n // WIN_W, x0, hk, col])
    else:
        t = DESC.load([img, start_n, hk, col])
    return t.reshape(BLOCK_N, WIDTH)


# Run-time scalars that Triton must not specialize on. By default it compiles a variant per value class of
# every int argument (== 1, divisible by 16), so a video memory of 4096 * frames + 4 * pointers keys, or a new
# mask width (its strides), or one object instead of several (n_bh), would each compile the kernel again.
# None of them feeds a Q / K / V / output address (the head dim is the contiguous axis of every such load);
# the mask strides address the block lists, read once per program.
RUNTIME_SCALARS = ("seqlen_q", "seqlen_k", "n_bh", "n_split", "ws_rows", "stride_numb", "stride_numh", "stride_numm",
                   "stride_idxb", "stride_idxh", "stride_idxm")


@triton.jit(do_not_specialize=RUNTIME_SCALARS)
def _attn_fwd(
    Q, K, V, Out,
    WS_O, WS_L,
    K_PAD, V_PAD,
    DESC_K0, DESC_K1, DESC_V0, DESC_V1,
    KV_NUM, KV_IDX,
    REL_H, REL_W,
    CU_Q, CU_K,
    sm_scale,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_on, stride_oh, stride_od,
    stride_qx, stride_kx, stride_vx, stride_ox,
    stride_numb, stride_numh, stride_numm,
    stride_idxb, stride_idxh, stride_idxm,
    stride_rhb, stride_rhh, stride_rhm, stride_rhk,
    stride_rwb, stride_rwh, stride_rwm, stride_rwk,
    seqlen_q, seqlen_k, num_heads, kv_group,
    KH: tl.constexpr, KW: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    grid_h, grid_w, q_grid_h, q_grid_w, win_rows, win_cols, n_windows, n_launch, n_bh, n_split, ws_rows,
    D_REAL: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, D1_AT: tl.constexpr,
    DV_REAL: tl.constexpr, DV0: tl.constexpr, DV1: tl.constexpr, DV1_AT: tl.constexpr,
    MASK_BLOCK: tl.constexpr, KB_P: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, VARLEN: tl.constexpr,
    WINDOW: tl.constexpr, WIN_H: tl.constexpr, WIN_W: tl.constexpr, QWIN_H: tl.constexpr, QWIN_W: tl.constexpr,
    WIN_PAD: tl.constexpr, CROP: tl.constexpr, PACK: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BIAS_PATH: tl.constexpr, RECT_H: tl.constexpr, RECT_W: tl.constexpr,
    W_HOIST: tl.constexpr, USE_WDOT: tl.constexpr,
    KH_P: tl.constexpr, KW_P: tl.constexpr,
    EVEN_N: tl.constexpr, TAIL_N: tl.constexpr,
    TMA: tl.constexpr,
    ALIGN: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # The q / k / v / out strides arrive divided by ALIGN (elements; see _address_align): multiplied back
    # here, they tell the compiler that every row starts on an ALIGN boundary, so rows load in 16-byte
    # vectors. Without it a head dim of 56 or 72 (a head stride not divisible by 16) loaded element by
    # element: 2.3-2.9x slower than head dim 64 at Hiera's shapes (docs/benchmarks.md, run 52).
    stride_qb, stride_qn, stride_qh, stride_qx = stride_qb * ALIGN, stride_qn * ALIGN, stride_qh * ALIGN, stride_qx * ALIGN
    stride_kb, stride_kn, stride_kh, stride_kx = stride_kb * ALIGN, stride_kn * ALIGN, stride_kh * ALIGN, stride_kx * ALIGN
    stride_vb, stride_vn, stride_vh, stride_vx = stride_vb * ALIGN, stride_vn * ALIGN, stride_vh * ALIGN, stride_vx * ALIGN
    stride_ob, stride_on, stride_oh, stride_ox = stride_ob * ALIGN, stride_on * ALIGN, stride_oh * ALIGN, stride_ox * ALIGN
    LOG2E: tl.constexpr = 1.4426950408889634
    # Stand-in for -inf inside MMAs (-inf * 0 is NaN). A row whose running max is below NEG_CUT (scaled)
    # has seen no real key yet and gets probability 0 everywhere, as a row whose keys are all -inf.
    NEG_BIG: tl.constexpr = -2.0e38
    NEG_CUT: tl.constexpr = -1.0e38
    # BIAS_PATH values: BIAS_NONE, BIAS_RECT, BIAS_ONEHOT (BIAS_GATHER is the remaining one).
    NO_BIAS: tl.constexpr = 0
    RECT: tl.constexpr = 1
    ONEHOT: tl.constexpr = 2
    pid_m = tl.program_id(0)
    if SPLIT:
        # Split over the keys: program axis 0 is (query tile, split), the splits of one tile side by side.
        pid_s = pid_m % n_split
        pid_m = pid_m // n_split
    # (sequence, head) pairs run along grid axes 1 and 2: axis 1 alone holds at most 65535, fewer than
    # Hiera's windows x heads x batch (hiera_b+ stage 3 at batch 8: 1024 x 8 x 8).
    pid_bh = tl.program_id(1) + tl.program_id(2) * tl.num_programs(1)
    if pid_bh >= n_bh:
        return
    b = pid_bh // num_heads  # the sequence: a batch row, or one (image, window) pair in WINDOW mode
    h = pid_bh % num_heads
    hk = h // kv_group
    img = b
    y0 = 0  # the window's top-left key (WINDOW mode); _tma_tile reads it only there
    x0 = 0
    if WINDOW:
        # A launch covers n_launch windows per image: either those inside the grid, or (WIN_PAD) those
        # that overhang it, the last column's first, then the rest of the last row's.
        img = b // n_launch
        w = b % n_launch
        col_over = (win_cols * WIN_W > grid_w).to(tl.int32)
        if WIN_PAD:
            in_col = w < win_rows * col_over
            wy = tl.where(in_col, w, win_rows - 1)
            wx = tl.where(in_col, win_cols - 1, w - win_rows * col_over)
        else:
            groups = (win_cols - col_over) // PACK  # PACK windows side by side per program (packed windows)
            wy = w // groups
            wx = (w % groups) * PACK
        b = img * n_windows + wy * win_cols + wx  # the window's row in (batch * windows) block masks
        y0 = wy * WIN_H  # the window's top-left key on the key grid
        x0 = wx * WIN_W
        qy0 = wy * QWIN_H  # its top-left query on the query grid (the key grid unless q was pooled)
        qx0 = wx * QWIN_W
        seqlen_q = seqlen_q * PACK
        seqlen_k = seqlen_k * PACK
        if CROP:
            # A window that overhangs the grid, cropped to it: its queries and keys on the grid, each rectangle in
            # raster order (q_w and k_w wide), so no tile holds padding. Its padding keys join as one key below.
            q_w = tl.minimum(QWIN_W, q_grid_w - qx0)
            k_w = tl.minimum(WIN_W, grid_w - x0)
            inv_k_w = 1.0 / k_w.to(tl.float32)
            seqlen_q = tl.minimum(QWIN_H, q_grid_h - qy0) * q_w
            seqlen_k = tl.minimum(WIN_H, grid_h - y0) * k_w
            if pid_m * BLOCK_M >= seqlen_q:
                return
        elif qy0 + (pid_m * BLOCK_M) // (QWIN_W * PACK) >= q_grid_h:
            return  # every query of this tile lies in the padding below the grid: no output to write

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
        q_base = Q + img.to(tl.int64) * stride_qb + h * stride_qh
        k_base = K + img.to(tl.int64) * stride_kb + hk * stride_kh
        v_base = V + img.to(tl.int64) * stride_vb + hk * stride_vh
        o_base = Out + img.to(tl.int64) * stride_ob + h * stride_oh

    # Scores stay in q.k units through the loop (biases are divided by sm_scale once, up front), so the
    # scale joins the exp2 argument in one FMA per score. sm_scale > 0 (interface.check_scale), so the
    # row max of the unscaled scores times qk_scale is the row max of the scaled ones.
    qk_scale = sm_scale * LOG2E
    inv_scale = 1.0 / sm_scale
    dead_max = NEG_CUT * qk_scale  # -inf when that overflows, and then so does NEG_BIG * qk_scale

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if WINDOW:
        # Query t of the window sits at (qy0 + t // QWIN_W, qx0 + t % QWIN_W) on the query grid; queries
        # past the grid are padding. (Windows are constexprs: these divisions become multiply-shifts.)
        # Packed, the tile's queries are the QWIN_H x (PACK * QWIN_W) rectangle of PACK windows side by side.
        # Cropped, they are the window's on the grid, q_w per row (a run-time width: _divmod_small).
        if CROP:
            qy, qx = _divmod_small(offs_m, q_w, 1.0 / q_w.to(tl.float32))
            qy += qy0
            qx += qx0
        else:
            qy = qy0 + offs_m // (QWIN_W * PACK)
            qx = qx0 + offs_m % (QWIN_W * PACK)
        m_ok = (offs_m < seqlen_q) & (qy < q_grid_h) & (qx < q_grid_w)
        q_rows = qy * stride_qn + qx * stride_qx
        o_rows = qy * stride_on + qx * stride_ox
        bias_rows = qy * q_grid_w + qx  # rel_h / rel_w hold one row per query-grid token, raster order
    else:
        m_ok = offs_m < seqlen_q
        q_rows = offs_m * stride_qn
        o_rows = offs_m * stride_on
        bias_rows = offs_m
    offs_d0 = tl.arange(0, D0)
    d0_ok = offs_d0 < D_REAL
    q0 = tl.load(q_base + q_rows[:, None] + offs_d0[None, :] * stride_qd,
                 mask=m_ok[:, None] & d0_ok[None, :], other=0.0)
    if D1 > 0:
        offs_d1 = D1_AT + tl.arange(0, D1)
        d1_ok = offs_d1 < D_REAL  # all True: the second chunk ends at or before the last column
        # The columns both chunks hold (an overlapping chunk: D1_AT < D0) count once in q . k: not loaded here (zeros in
        # q), so that the loop's K loads of the chunk take every column, as in an exact split. Masked on load, not
        # zeroed after it: a q1 rewritten in registers made ptxas serialize every wgmma of the loop (its warning C7515;
        # 356 SASS instructions per step at hiera_l's 16 x 16 windows against 337 for an exact 80 = 64 + 16).
        q1 = tl.load(q_base + q_rows[:, None] + offs_d1[None, :] * stride_qd,
                     mask=m_ok[:, None] & (d1_ok & (offs_d1 >= D0))[None, :], other=0.0)
    # V's columns, and the output's, in chunks of their own (DV_REAL may differ from q / k's D_REAL).
    offs_v0 = tl.arange(0, DV0)
    v0_ok = offs_v0 < DV_REAL
    if DV1 > 0:
        offs_v1 = DV1_AT + tl.arange(0, DV1)
        v1_ok = offs_v1 < DV_REAL
        v1_own = v1_ok  # the columns this chunk writes: all, unless it overlaps the first chunk (which writes them)
        if DV1_AT < DV0:
            v1_own = v1_ok & (offs_v1 >= DV0)
    if WIN_PAD:
        # Padding keys (where a window overhangs the grid) all have the kv head's K_PAD / V_PAD vectors.
        # Their tiles load as zeros, as any missing key; then q . k_pad is added to their logits and
        # their probability mass is collected in pad_l and multiplied by v_pad at the end. (Selecting
        # pad addresses, or branching on edge windows inside the loop, would cost the K / V loads
        # their pipelining.)
        k_pad0 = tl.load(K_PAD + hk * D_REAL + offs_d0, mask=d0_ok, other=0.0).to(tl.float32)
        q_kpad = tl.sum(q0.to(tl.float32) * k_pad0[None, :], 1)
        if D1 > 0:
            k_pad1 = tl.load(K_PAD + hk * D_REAL + offs_d1, mask=d1_ok, other=0.0).to(tl.float32)
            q_kpad += tl.sum(q1.to(tl.float32) * k_pad1[None, :], 1)
        pad_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    if INTERP:
        # The interpreter computes low-precision tl.dot wrongly (triton issue 11584): use fp32 operands.
        q0 = q0.to(tl.float32)
        if D1 > 0:
            q1 = q1.to(tl.float32)

    if HAS_BIAS:
        # rel_h / rel_w may be stored (B, H, k, N) (stride_rhm == 1): then every load below is coalesced.
        rh_vec = REL_H + img.to(tl.int64) * stride_rhb + h * stride_rhh + bias_rows * stride_rhm
        rh_base = rh_vec[:, None]
        rw_base = REL_W + img.to(tl.int64) * stride_rwb + h * stride_rwh + bias_rows[:, None] * stride_rwm
        tiles_per_row = KW // TILE_W
        per_tile = TILE_H * TILE_W
        if BIAS_PATH == RECT:
            subs_w = TILE_W // RECT_W
            if W_HOIST:
                # The key tile spans whole grid rows, so its rel_w slice is the same every step.
                bias_w_rows = tl.load(rw_base + tl.arange(0, RECT_W)[None, :] * stride_rwk, mask=m_ok[:, None], other=0.0)
                bias_w_rows = bias_w_rows.to(tl.float32) * inv_scale
                if USE_WDOT:
                    # rel_w @ I adds rel_w to every score inside the MMA. That frees the registers the
                    # fp32 rel_w tile holds (docs/benchmarks.md, runs 6 and 28). rel_w / sm_scale is
                    # rounded to bf16: exact for SAM's bf16 rel_w when sm_scale is a power of two
                    # (head dims 16, 64, 256), one bf16 rounding otherwise, as SAM's own bf16 bias.
                    bias_w_lp = tl.where(bias_w_rows == float("-inf"), NEG_BIG, bias_w_rows).to(tl.bfloat16)
                    eye = tl.arange(0, RECT_W)[:, None] == tl.arange(0, BLOCK_N)[None, :]
                    if INTERP:  # fp32 operands (issue 11584 above); the interpreter's bool -> bf16 is wrong too
                        bias_w_lp = bias_w_lp.to(tl.float32)
                        eye = eye.to(tl.float32)
                    else:
                        eye = eye.to(tl.bfloat16)
        if BIAS_PATH == ONEHOT:
            # Whole rel_h / rel_w rows of this program's queries, divided by sm_scale (q.k units).
            kh_r = tl.arange(0, KH_P)
            kw_r = tl.arange(0, KW_P)
            rel_h_rows = tl.load(rh_base + kh_r[None, :] * stride_rhk, mask=m_ok[:, None] & (kh_r[None, :] < KH), other=0.0)
            rel_w_rows = tl.load(rw_base + kw_r[None, :] * stride_rwk, mask=m_ok[:, None] & (kw_r[None, :] < KW), other=0.0)
            rel_h_rows = rel_h_rows.to(tl.float32) * inv_scale
            rel_w_rows = rel_w_rows.to(tl.float32) * inv_scale
            rel_h_rows = tl.where(rel_h_rows == float("-inf"), NEG_BIG, rel_h_rows)
            rel_w_rows = tl.where(rel_w_rows == float("-inf"), NEG_BIG, rel_w_rows)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CROP:
        # The cropped window's padding keys all have k_pad: together one key of weight n_pad, whose logit (log2 units,
        # as m_i) starts the running max. Where it is below the cut, the first step's alpha (_online_softmax) weighs
        # it 0, as the padded path weighs each padding key.
        m_i = q_kpad * qk_scale
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + (WIN_H * WIN_W - seqlen_k).to(tl.float32)
        pad_l = l_i
    acc0 = tl.zeros([BLOCK_M, DV0], dtype=tl.float32)
    if DV1 > 0:
        acc1 = tl.zeros([BLOCK_M, DV1], dtype=tl.float32)

    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_N
    if HAS_MASK:
        q_block = (pid_m * BLOCK_M) // MASK_BLOCK
        num = tl.load(KV_NUM + b * stride_numb + h * stride_numh + q_block * stride_numm)
        idx_base = KV_IDX + b * stride_idxb + h * stride_idxh + q_block * stride_idxm
        # Key tiles that hold keys, per listed block: SUBS for full blocks, fewer for the partial last
        # one, none past seqlen_k. Blocks are listed in ascending order, so these steps come first.
        kb_r = tl.arange(0, KB_P)
        listed = kb_r < num
        blocks = tl.load(idx_base + kb_r, mask=listed, other=0)
        tiles = (seqlen_k - blocks * MASK_BLOCK + BLOCK_N - 1) // BLOCK_N
        tiles = tl.minimum(tl.maximum(tiles, 0), SUBS)
        n_steps = tl.sum(tl.where(listed, tiles, 0), 0)
    elif TAIL_N > 0:
        n_steps = seqlen_k // BLOCK_N  # full steps only: the rest is the tail's
    else:
        n_steps = tl.cdiv(seqlen_k, BLOCK_N)
    if TAIL_N > 0:
        # The last seqlen_k % BLOCK_N keys (at most TAIL_N) go in one narrow tile after the loop, so that no step of
        # the loop is mostly empty and none needs a key mask: a 14 x 14 window's 196 keys as 3 x 64 + 16 (4 of them
        # keys), not 4 x 64. Loaded and scored here, before the loop, so that their latency hides behind it, and so
        # that no wgmma runs between the loop's last one and the tail's rescaling of the accumulators: a tail QK after
        # the loop made ptxas serialize every wgmma of the kernel (its warning C7515; 360 SASS instructions per step at
        # hiera_b+'s 14 x 14 windows against 332 now).
        # Windows only (make_plan), never packed: key t of the window sits at (y0 + t // WIN_W, x0 + t % WIN_W).
        offs_t = n_steps * BLOCK_N + tl.arange(0, TAIL_N)
        t_ok, t_k_rows, t_v_rows = _grid_keys(y0 + offs_t // WIN_W, x0 + offs_t % WIN_W, offs_t < seqlen_k, grid_h,
                                              grid_w, stride_kn, stride_kx, stride_vn, stride_vx)
        t_k0 = tl.load(k_base + t_k_rows[None, :] + offs_d0[:, None] * stride_kd, mask=t_ok[None, :] & d0_ok[:, None],
                       other=0.0)
        t_v0 = tl.load(v_base + t_v_rows[:, None] + offs_v0[None, :] * stride_vd, mask=t_ok[:, None] & v0_ok[None, :],
                       other=0.0)
        if D1 > 0:
            t_k1 = tl.load(k_base + t_k_rows[None, :] + offs_d1[:, None] * stride_kd,
                           mask=t_ok[None, :] & d1_ok[:, None], other=0.0)
        if DV1 > 0:
            t_v1 = tl.load(v_base + t_v_rows[:, None] + offs_v1[None, :] * stride_vd,
                           mask=t_ok[:, None] & v1_ok[None, :], other=0.0)
        if INTERP:
            t_k0 = t_k0.to(tl.float32)
        t_qk = tl.dot(q0, t_k0, input_precision=DOT_PREC)
        if D1 > 0:
            if INTERP:
                t_k1 = t_k1.to(tl.float32)
            t_qk = tl.dot(q1, t_k1, t_qk, input_precision=DOT_PREC)
        t_qk = tl.where(t_ok[None, :], t_qk, float("-inf"))

    if not HAS_MASK:
        idx_base = KV_IDX  # not read
    # This program's key steps: all of them, or (SPLIT) its share of the tile's steps, in order.
    lo = 0
    hi = n_steps
    if SPLIT:
        per = tl.cdiv(n_steps, n_split)
        lo = tl.minimum(pid_s * per, n_steps)
        hi = tl.minimum(lo + per, n_steps)
    if BIAS_PATH == RECT:
        if RECT_H == 1:
            # rel_h of a one-row key tile is one value per query, loaded one step ahead: a load used in
            # the same step would stall the softmax for a whole global-memory round trip every step.
            start0 = _key_start(lo, idx_base, lo < hi, HAS_MASK, SUBS, MASK_BLOCK, BLOCK_N)
            row0 = _rect_row(start0, per_tile, tiles_per_row, TILE_H, subs_w, BLOCK_N, RECT_H)
            rh_next = tl.load(rh_vec + row0 * stride_rhk, mask=m_ok & (lo < hi), other=0.0)

    offs_nb = tl.arange(0, BLOCK_N)
    # Every key of every loop step lies in the sequence (whole steps) and, in a window, on the grid (windows inside
    # it): the loop's K / V loads then take no key mask. Where a step is also whole grid rows of the (packed) window,
    # its key rows are the first step's moved down by whole rows: one scalar per step instead of each key's grid cell
    # and address. Together a fifth of the 16 x 16 windows' loop instructions (361 -> 294 at head dim 64, as a
    # minimal window kernel's 295; docs/benchmarks.md, runs 121-122).
    KEYS_IN: tl.constexpr = EVEN_N and not WIN_PAD
    ROWS_SHIFT: tl.constexpr = KEYS_IN and WINDOW and not CROP and BLOCK_N % (WIN_W * PACK) == 0
    if ROWS_SHIFT:
        # (the step-0 keys are all on the grid: only their row offsets are wanted)
        _, k_rows0, v_rows0 = _grid_keys(y0 + offs_nb // (WIN_W * PACK), x0 + offs_nb % (WIN_W * PACK), offs_nb >= 0,
                                         grid_h, grid_w, stride_kn, stride_kx, stride_vn, stride_vx)
    for step in range(lo, hi):
        start_n = _key_start(step, idx_base, True, HAS_MASK, SUBS, MASK_BLOCK, BLOCK_N)
        if BIAS_PATH == RECT:
            if RECT_H == 1:
                rh_cur = rh_next
                more = step + 1 < hi
                start_next = _key_start(step + 1, idx_base, more, HAS_MASK, SUBS, MASK_BLOCK, BLOCK_N)
                row_next = _rect_row(start_next, per_tile, tiles_per_row, TILE_H, subs_w, BLOCK_N, RECT_H)
                rh_next = tl.load(rh_vec + row_next * stride_rhk, mask=m_ok & more, other=0.0)
        offs_n = start_n + offs_nb
        n_ok = offs_n < seqlen_k
        if ROWS_SHIFT:
            k_rows = k_rows0 + (start_n // (WIN_W * PACK)) * stride_kn
            v_rows = v_rows0 + (start_n // (WIN_W * PACK)) * stride_vn
        elif WINDOW:
            if CROP:
                ky, kx = _divmod_small(offs_n, k_w, inv_k_w)
                ky += y0
                kx += x0
            else:
                ky = y0 + offs_n // (WIN_W * PACK)
                kx = x0 + offs_n % (WIN_W * PACK)
            k_in, k_rows, v_rows = _grid_keys(ky, kx, n_ok, grid_h, grid_w, stride_kn, stride_kx, stride_vn, stride_vx)
        else:
            k_in = n_ok
            k_rows = offs_n * stride_kn
            v_rows = offs_n * stride_vn
        if KEYS_IN:
            k_in = tl.full([BLOCK_N], True, tl.int1)  # constant: the loads' masks fold to their head-dim columns
        k_src = k_base + k_rows[None, :]
        v_src = v_base + v_rows[:, None]

        if TMA:
            # Hopper: the copy engine brings the (BLOCK_N, D) tile into shared memory; keys past the
            # sequence (or, in a window, past the grid) are out of the descriptor's bounds and arrive as zeros.
            k0 = tl.trans(_tma_tile(DESC_K0, img, start_n, hk, 0, y0, x0, WINDOW, WIN_W * PACK, BLOCK_N, D0))
        else:
            k0 = tl.load(k_src + offs_d0[:, None] * stride_kd, mask=k_in[None, :] & d0_ok[:, None], other=0.0)
        if INTERP:
            k0 = k0.to(tl.float32)
        qk = tl.dot(q0, k0, input_precision=DOT_PREC)
        if D1 > 0:
            if TMA:  # the second chunk's columns, from the same descriptor's tensor at column D1_AT
                k1 = tl.trans(_tma_tile(DESC_K1, img, start_n, hk, D1_AT, y0, x0, WINDOW, WIN_W * PACK, BLOCK_N, D1))
            else:
                k1 = tl.load(k_src + offs_d1[:, None] * stride_kd, mask=k_in[None, :] & d1_ok[:, None], other=0.0)
            if INTERP:
                k1 = k1.to(tl.float32)
            qk = tl.dot(q1, k1, qk, input_precision=DOT_PREC)
        if WIN_PAD and not CROP:
            pad_k = (n_ok & ~k_in).to(tl.float32)  # 1.0 for padding keys: their q . k is 0 so far
            qk += pad_k[None, :] * q_kpad[:, None]

        row_off = tl.zeros([BLOCK_M], dtype=tl.float32)
        if BIAS_PATH == RECT:
            n_tile = start_n // per_tile
            sub = (start_n % per_tile) // BLOCK_N
            row0 = _rect_row(start_n, per_tile, tiles_per_row, TILE_H, subs_w, BLOCK_N, RECT_H)
            col0 = (n_tile % tiles_per_row) * TILE_W + (sub % subs_w) * RECT_W
            if USE_WDOT:
                qk = tl.dot(bias_w_lp, eye, qk)
            elif W_HOIST:
                bias_w = bias_w_rows
            else:
                bias_w = tl.load(rw_base + (col0 + tl.arange(0, RECT_W)[None, :]) * stride_rwk, mask=m_ok[:, None], other=0.0)
                bias_w = bias_w.to(tl.float32) * inv_scale
            if RECT_H == 1:
                # One grid row: rel_h is one value per query row. It shifts the whole row, so it goes
                # into the running max instead of into every score (one FMA per score, as without bias).
                if not USE_WDOT:
                    qk += bias_w
                row_off = rh_cur.to(tl.float32) * LOG2E
            else:
                bias_h = tl.load(rh_base + (row0 + tl.arange(0, RECT_H)[None, :]) * stride_rhk, mask=m_ok[:, None], other=0.0)
                bias_h = bias_h.to(tl.float32) * inv_scale
                qk += tl.reshape(bias_h[:, :, None] + bias_w[:, None, :], (BLOCK_M, BLOCK_N))
        elif BIAS_PATH != NO_BIAS:
            if WINDOW:  # keys are the window's tokens in raster order
                key_row = offs_n // WIN_W
                key_col = offs_n % WIN_W
            else:
                n_tile = offs_n // per_tile
                inner = offs_n % per_tile
                key_row = (n_tile // tiles_per_row) * TILE_H + inner // TILE_W
                key_col = (n_tile % tiles_per_row) * TILE_W + inner % TILE_W
            if BIAS_PATH == ONEHOT:
                hot_h = (tl.arange(0, KH_P)[:, None] == key_row[None, :]).to(tl.float32)
                hot_w = (tl.arange(0, KW_P)[:, None] == key_col[None, :]).to(tl.float32)
                qk = tl.dot(rel_h_rows, hot_h, qk, input_precision=DOT_PREC)
                qk = tl.dot(rel_w_rows, hot_w, qk, input_precision=DOT_PREC)
            else:
                ok = m_ok[:, None] & n_ok[None, :]
                bias_h = tl.load(rh_base + key_row[None, :] * stride_rhk, mask=ok, other=0.0).to(tl.float32)
                bias_w = tl.load(rw_base + key_col[None, :] * stride_rwk, mask=ok, other=0.0).to(tl.float32)
                qk += (bias_h + bias_w) * inv_scale

        if PACK > 1:
            # Packed windows: a query sees only the keys of its own window (the tile is block-diagonal).
            own = ((offs_m % (QWIN_W * PACK)) // QWIN_W)[:, None] == ((offs_n % (WIN_W * PACK)) // WIN_W)[None, :]
            qk = tl.where(own, qk, float("-inf"))
        if not EVEN_N:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))

        p, alpha, m_i, l_i = _online_softmax(qk, m_i, l_i, qk_scale, row_off, dead_max)
        if CROP:
            pad_l = pad_l * alpha
        elif WIN_PAD:
            pad_l = pad_l * alpha + tl.sum(p * pad_k[None, :], 1)

        if TMA:
            v0 = _tma_tile(DESC_V0, img, start_n, hk, 0, y0, x0, WINDOW, WIN_W * PACK, BLOCK_N, DV0)
        else:
            v0 = tl.load(v_src + offs_v0[None, :] * stride_vd, mask=k_in[:, None] & v0_ok[None, :], other=0.0)
        # P is rounded to the input dtype before the PV product, as on the GPU.
        p_lp = p.to(v0.dtype)
        if INTERP:
            p_lp = p_lp.to(tl.float32)
            v0 = v0.to(tl.float32)
        acc0 = tl.dot(p_lp, v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if DV1 > 0:
            if TMA:
                v1 = _tma_tile(DESC_V1, img, start_n, hk, DV1_AT, y0, x0, WINDOW, WIN_W * PACK, BLOCK_N, DV1)
            else:
                v1 = tl.load(v_src + offs_v1[None, :] * stride_vd, mask=k_in[:, None] & v1_ok[None, :], other=0.0)
            if INTERP:
                v1 = v1.to(tl.float32)
            acc1 = tl.dot(p_lp, v1, acc1 * alpha[:, None], input_precision=DOT_PREC)

    if TAIL_N > 0:
        p_dtype = t_v0.dtype  # P is rounded to the input dtype before the PV product, as in the loop
        if INTERP:
            t_v0 = t_v0.to(tl.float32)
        p, alpha, m_i, l_i = _online_softmax(t_qk, m_i, l_i, qk_scale, tl.zeros([BLOCK_M], dtype=tl.float32), dead_max)
        p_lp = p.to(p_dtype)
        if INTERP:
            p_lp = p_lp.to(tl.float32)
        acc0 = tl.dot(p_lp, t_v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if DV1 > 0:
            if INTERP:
                t_v1 = t_v1.to(tl.float32)
            acc1 = tl.dot(p_lp, t_v1, acc1 * alpha[:, None], input_precision=DOT_PREC)

    if WIN_PAD:
        v_pad0 = tl.load(V_PAD + hk * DV_REAL + offs_v0, mask=v0_ok, other=0.0).to(tl.float32)
        acc0 += pad_l[:, None] * v_pad0[None, :]
        if DV1 > 0:
            v_pad1 = tl.load(V_PAD + hk * DV_REAL + offs_v1, mask=v1_ok, other=0.0).to(tl.float32)
            acc1 += pad_l[:, None] * v_pad1[None, :]
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    if SPLIT:
        # A partial result, in fp32, for _split_combine: this split's normalized output and its row
        # log-sum-exp (log2 units, the row_off bias included in m_i), -inf for rows that saw no key.
        ws = (pid_s * n_bh + pid_bh).to(tl.int64) * ws_rows + offs_m
        tl.store(WS_L + ws, tl.where(l_i > 0.0, m_i + tl.math.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf")))
        ws_o = WS_O + ws[:, None] * (DV1_AT + DV1)  # a row per query, up to the last chunk's end column
        tl.store(ws_o + offs_v0[None, :], acc0 * inv_l[:, None])
        if DV1 > 0:
            if DV1_AT < DV0:
                tl.store(ws_o + offs_v1[None, :], acc1 * inv_l[:, None], mask=v1_own[None, :])
            else:
                tl.store(ws_o + offs_v1[None, :], acc1 * inv_l[:, None])
    else:
        o_ptrs = o_base + o_rows[:, None]
        tl.store(o_ptrs + offs_v0[None, :] * stride_od, (acc0 * inv_l[:, None]).to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & v0_ok[None, :])
        if DV1 > 0:
            tl.store(o_ptrs + offs_v1[None, :] * stride_od, (acc1 * inv_l[:, None]).to(Out.dtype.element_ty),
                     mask=m_ok[:, None] & v1_own[None, :])


@triton.jit(do_not_specialize=("seqlen_q", "n_split", "n_bh", "ws_rows"))
def _split_combine(
    WS_O, WS_L, Out, CU_Q,
    stride_ob, stride_on, stride_oh, stride_od,
    seqlen_q, num_heads, n_split, n_bh, ws_rows,
    D_REAL: tl.constexpr, DW: tl.constexpr, D_P: tl.constexpr, BLOCK: tl.constexpr, VARLEN: tl.constexpr,
):
    """Merge the n_split partial results of _attn_fwd(SPLIT=1): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)
    per row, M the rows' largest lse. A row no split saw a key of (every lse -inf) gets zeros."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        o_base = Out + q_start.to(tl.int64) * stride_on + h * stride_oh
    else:
        o_base = Out + b.to(tl.int64) * stride_ob + h * stride_oh
    if pid_m * BLOCK >= seqlen_q:
        return
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    m_ok = offs_m < seqlen_q
    offs_d = tl.arange(0, D_P)
    top = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for s in range(0, n_split):
        ws = (s * n_bh + pid_bh).to(tl.int64) * ws_rows + offs_m
        top = tl.maximum(top, tl.load(WS_L + ws, mask=m_ok, other=float("-inf")))
    top = tl.where(top == float("-inf"), 0.0, top)
    acc = tl.zeros([BLOCK, D_P], dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, n_split):
        ws = (s * n_bh + pid_bh).to(tl.int64) * ws_rows + offs_m
        w = tl.math.exp2(tl.load(WS_L + ws, mask=m_ok, other=float("-inf")) - top)
        o = tl.load(WS_O + ws[:, None] * DW + offs_d[None, :], mask=m_ok[:, None] & (offs_d < DW)[None, :], other=0.0)
        acc += w[:, None] * o
        total += w
    acc = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d < D_REAL)[None, :])


# ---------------------------------------------------------------------------------------------------
# Launch configs: the tuning space, pruned to the problem
# ---------------------------------------------------------------------------------------------------


def _configs() -> List[dict]:
    out = []
    for bm in (16, 32, 64, 128):
        for bn in (16, 32, 64, 128):
            warps = 8 if bm * bn >= 128 * 64 else 4
            for stages in (2, 3):
                for w_dot in (0, 1):
                    out.append(dict(BLOCK_M=bm, BLOCK_N=bn, W_DOT=w_dot, num_warps=warps, num_stages=stages))
    # Hopper: K / V through TMA descriptors, for the two usual winners (docs/benchmarks.md, runs 24 and
    # 29: with the rel-pos bias TMA now wins at every SAM shape; a register cap of 128 on top of it did not
    # pay, and at head dim 256 ptxas cannot meet it).
    for bm, warps in ((128, 8), (64, 4)):
        out.append(dict(BLOCK_M=bm, BLOCK_N=64, W_DOT=0, num_warps=warps, num_stages=3, TMA=1))
    # Windows of several 64-key steps (hiera_l's 16 x 16): TMA at 2 stages won there (0.095 ms against 0.103 at 3
    # stages and 0.107 for pointer loads, run 84); not measured on sequences, so offered to windows only.
    out.append(dict(BLOCK_M=64, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=2, TMA=1, WINDOWS_ONLY=1))
    out.extend(WIDE_HEAD_CONFIGS)
    return out


# Head dims above 128 in 16 bits (SAM 2's memory attention: 256, one head). The general space keeps only
# 64 x 64 tiles there (4 warps: 64 rows x 256 fp32 accumulators = 128 registers per thread). These add
# 128-row tiles over two warp groups (8 warps): the same 128 accumulator registers per thread, and each K / V
# tile loaded into shared memory serves twice the query rows, halving K / V traffic per FLOP (flash-attn's
# Hopper kernel uses 128-row tiles at head dim 256 too). Shared memory: Q 128 x 256 (64 KB) plus num_stages x
# (K + V) tiles: 2 x 64 KB at BLOCK_N 64, 3 x 32 KB at BLOCK_N 32, 192 / 160 KB, inside Hopper's 227 KB
# (not an A100's 163 KB: there the tuner meets OutOfResources and skips them). 3 stages at BLOCK_N 64
# (256 KB) fit nowhere. Whether they win is measured, per shape class, by the tuner.
WIDE_HEAD_CONFIGS = [
    dict(BLOCK_M=128, BLOCK_N=64, W_DOT=0, num_warps=8, num_stages=2, WIDE=1),
    dict(BLOCK_M=128, BLOCK_N=32, W_DOT=0, num_warps=8, num_stages=3, WIDE=1),
    dict(BLOCK_M=128, BLOCK_N=64, W_DOT=0, num_warps=8, num_stages=2, TMA=1, WIDE=1),
    # V of at most 128 columns beside q / k of 256 (SAM 2's memory cross-attention with V read before its
    # projection: 64): a (K + V) stage takes 40 KB at BLOCK_N 64, so 3 stages fit (Q 64 KB + 120 KB), and at
    # BLOCK_N 128 two (64 + 160 KB); the accumulator holds 32-64 registers per thread instead of 128.
    dict(BLOCK_M=128, BLOCK_N=64, W_DOT=0, num_warps=8, num_stages=3, TMA=1, WIDE=1, NARROW_V=1),
    dict(BLOCK_M=128, BLOCK_N=128, W_DOT=0, num_warps=8, num_stages=2, TMA=1, WIDE=1, NARROW_V=1),
]


def _prune(configs: List[dict], a: dict) -> List[dict]:
    """Keep configs that fit the problem: tiles inside one mask block, not far larger than the sequences,
    and none that only twins another kept one.

    For long sequences that leaves 64/128-row tiles, for SAM's few-token decoder sides the 16-row ones.
    Tuning compiles each kept config once per shape class, one after another in effect (Triton's front end
    holds the GIL), so every config cut here is time off a patched model's first call.
    """
    mb = a["MASK_BLOCK"]
    max_m = max(16, min(128, next_pow2(a["seqlen_q"])))
    max_n = max(16, min(128, next_pow2(a["seqlen_k"])))
    d = max(a["D0"] + a["D1"], a["DV"])  # the wider of q / k's and v's (the accumulator's) head dims
    # Wide fp32 heads need small tiles to fit in shared memory (64 x 64 x 256 fp32 does not on an H200).
    low = 16 if d > 128 and a["IS_FP32"] else 64
    wide = d > 128 and not a["IS_FP32"]  # WIDE_HEAD_CONFIGS apply
    # Launches small enough for the host to be what the GPU waits for keep their pointer-load tiles: those
    # launch in about a third of a TMA tile's host time (no descriptors to build and encode), run 86.
    tma_twins = set() if a.get("HOST_SCALE") else {_twin_key(c) for c in configs if c.get("TMA") and _tma_candidate(c, a)}
    twins = {_stage_twin(c) for c in configs}
    keep = []
    for c in configs:
        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
        inside = not (mb % bm or mb % bn or bm > max_m or bn > max_n)
        if c.get("WIDE"):
            fits = wide and inside and not (c.get("NARROW_V") and a["DV"] > 128)  # sized by hand (WIDE_HEAD_CONFIGS)
        else:
            fits = inside and bm >= min(low, max_m) and bn >= min(low, max_n)
            fits = fits and not ((d > 128 or a["IS_FP32"]) and bm * bn > 64 * 64)
        if not fits:
            continue
        if c["W_DOT"] and not _wdot_applies(a, bn):
            continue  # it would compile a twin of the W_DOT=0 config
        if c.get("TMA") and not _tma_candidate(c, a):
            continue
        if c["num_stages"] == 2 and triton.cdiv(a["seqlen_k"], bn) < 3 and _stage_twin(c, 3) in twins:
            continue  # a key loop of 1-2 steps fills no third stage: twins (3 as fast or faster, run 63)
        if not c.get("TMA") and not c["W_DOT"] and _twin_key(c) in tma_twins:
            continue  # K / V through TMA won wherever both ran (docs/benchmarks.md: runs 24, 29, 60, 63, 84)
        if (a["WINDOW"] and not (a["HAS_BIAS"] or a.get("HAS_MASK") or a["IS_FP32"]) and a["TMA_OK"]
                and not a.get("HOST_SCALE") and c["num_stages"] == 3 and triton.cdiv(a["seqlen_k"], bn) >= 3
                and (c.get("TMA") or a["WIN_HW"][1] & (a["WIN_HW"][1] - 1)) and _stage_twin(c, 2) in twins):
            # Hiera's dense windows of three or more key steps on Hopper in 16 bits, where the GPU is what a launch
            # waits on, read through TMA or at a width that is no power of two: 2 stages were as fast as 3 or
            # faster at every such window measured (hiera_l's 16 x 16 through TMA: 0.097 against 0.105 ms in run
            # 122, 0.092 against 0.098 in run 124; its q-pooled block 0.059-0.061 against 0.060-0.063; hiera_b+'s
            # 14 x 14, pointer loads: 0.088-0.095 against 0.095-0.102, runs 115-122): one compile less per class
            # on a first call. Pointer loads at a power-of-two width keep both: 3 stages won at hiera_l's 16 x 16
            # (0.102-0.108 ms against 0.106-0.121, runs 81-124).
            continue
        if a["WINDOW"] and not a["HAS_BIAS"] and max(bm, bn) > 64:
            # Hiera's windows (16-256 tokens): 128-row tiles lost at every window shape (runs 59, 60, 63), and
            # so did 128-key ones (64 x 128 at hiera_l's 16 x 16 windows: 0.210 ms against 64 x 64's 0.108,
            # 0.114 against 0.063 for its q-pooled block; runs 76, 81): two compiles off hiera_l's first call.
            continue
        keep.append(c)
    if a["TMA_OK"] and d <= 128 and not a["WINDOW"] and not a.get("HOST_SCALE") and any(c.get("TMA") for c in keep):
        # Where K / V go through TMA at head dims up to 128, a TMA config won at every shape measured (SAM's
        # global blocks with rel-pos, runs 24 and 29; Hiera's at head dims 56, 72 and 96, runs 60 and 63: 0.946
        # ms against 1.140 for the best pointer-load tile at hiera_l's): the pointer-load tiles only cost the
        # first call their compiles (6 of hiera_l's 19). Head dim 256 (SAM 2's memory) keeps them: not measured so.
        keep = [c for c in keep if c.get("TMA")]
    return keep or [dict(BLOCK_M=16, BLOCK_N=16, W_DOT=0, num_warps=4, num_stages=1)]


def _sized_by_hand(a: dict) -> bool:
    """Whether problem a is 16-bit with head dims (q / k's and v's) up to 128: where packed windows and the key tail
    were sized for shared memory and measured."""
    return not a["IS_FP32"] and max(a["D0"] + a["D1"], a["DV"]) <= 128


def _pack_configs(a: dict) -> List[dict]:
    """The packed-window config for problem a, if any: windows of at most 32 queries (a power of two) that tile
    their grid without a block mask or rel-pos terms (PACK_COLS, the windows per grid row, divisible by PACK), in
    16 bits up to head dim 128; 64 / queries-per-window of them per 64-row tile (fewer where the block size is
    below 64), the packed keys (a power of two) in tiles of at most 64, pointer loads. Measured at
    hiera_l's three such layers, batch 8 (docs/benchmarks.md, run 110), it beat one window per program by 1.5-2.7x
    (4 x 4 windows 0.110 ms against 0.166; the pooled block into stage 2 0.244 against 0.437, into stage 3 0.127
    against 0.345), and beat 128-row packs (0.19-0.35 ms) and 32-row ones (0.147, 0.157); TMA gained 3% on one layer.
    So where it applies it is the only candidate: no tuning run, no compile of a loser on a first call."""
    tq, tk, cols = a["seqlen_q"], a["seqlen_k"], a.get("PACK_COLS", 0)
    rows = min(64, a["MASK_BLOCK"])  # a tile divides the block size, as every config's (_check_config)
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    # Measured and sized for 16-bit data up to head dim 128: a single candidate is never timed, so it must fit
    # in shared memory wherever it is offered (fp32, or a head of 256, keeps the pruned list and its tuning).
    if (not PACK_WINDOWS or not cols or not _sized_by_hand(a) or not pow2(tq) or rows // tq < 2
            or cols % (rows // tq)):
        return []
    pack = rows // tq
    if not pow2(tk) or tk * pack < 16:
        return []  # a key tile must be a power of two >= 16 (key windows smaller than the query windows: none)
    return [dict(BLOCK_M=rows, BLOCK_N=min(rows, tk * pack), W_DOT=0, num_warps=4, num_stages=3, PACK=pack)]


def _tma_candidate(c: dict, a: dict) -> bool:
    """Whether TMA config c is worth compiling for problem a: K / V can go through TMA (TMA_OK), and in a window
    the config's key tile is a box of whole rows (key_box) and the window takes more than one key step. One-step
    windows lost with TMA (hiera_l's 8 x 8 windows: 0.223 ms against 0.210 for pointer loads on the 256 x 256
    grid, 0.033 against 0.031 on 32 x 32; run 84); 16 x 16 ones, four steps, won (0.103 against 0.107)."""
    if not a["TMA_OK"]:
        return False
    if not a["WINDOW"]:
        return not c.get("WINDOWS_ONLY")
    return key_box(a["WIN_HW"], c["BLOCK_N"]) is not None and a["seqlen_k"] > c["BLOCK_N"]


def _stage_twin(c: dict, stages: Optional[int] = None) -> tuple:
    """Config c as a hashable key, its num_stages replaced by `stages` (if given), its WINDOWS_ONLY tag dropped."""
    changed = {**c, "num_stages": stages} if stages is not None else c
    return tuple(sorted(changed.items() - {("WINDOWS_ONLY", 1)}))


def _twin_key(c: dict) -> tuple:
    return c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], bool(c.get("WIDE"))


def _fixed_config(a: dict) -> dict:
    """One sensible config: used by the interpreter and when SAM_SPARSE_AUTOTUNE=0."""
    mb = a["MASK_BLOCK"]
    bm = min(64, mb, max(16, next_pow2(a["seqlen_q"])))
    bn = min(64, mb, max(16, next_pow2(a["seqlen_k"])))
    return dict(BLOCK_M=bm, BLOCK_N=bn, W_DOT=0, num_warps=4, num_stages=2)


def _derived(a: dict, cfg: dict) -> dict:
    """The constexprs that follow from the problem and the config (once per plan, never per call)."""
    bn = cfg["BLOCK_N"]
    path = _bias_path(a, bn)
    th, tw = _rect_tile(bn, a["tile_w"])
    return dict(
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, BIAS_PATH=path, RECT_H=th, RECT_W=tw,
        W_HOIST=tw == a["tile_w"] == a["KW"],
        USE_WDOT=bool(cfg.get("W_DOT")) and path == BIAS_RECT and _wdot_applies(a, bn),
        KH_P=max(16, next_pow2(a["KH"])), KW_P=max(16, next_pow2(a["KW"])),
        EVEN_N=(not a["VARLEN"]) and a["seqlen_k"] * cfg.get("PACK", 1) % bn == 0,
    )


def _tail_keys(seqlen_k: int, block_n: int) -> int:
    """The narrow tile (TAIL_N) for the keys past the last full BLOCK_N step: the next power of two >= 16 above
    their count, where that is narrower than a step; 0 where the keys end on a step (or it would not be)."""
    rem = seqlen_k % block_n
    width = max(16, next_pow2(rem)) if rem else 0
    return width if width < block_n else 0


def _check_config(cfg: dict, block_size: int) -> None:
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if block_size % bm or block_size % bn or min(bm, bn) < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"config {cfg}: BLOCK_M and BLOCK_N must be powers of two >= 16 dividing block_size={block_size}")
    split = cfg.get("SPLIT_K", 1)
    if split != "fill" and (isinstance(split, bool) or not isinstance(split, int) or not 1 <= split <= MAX_SPLIT):
        raise ValueError(f"config {cfg}: SPLIT_K must be an int in 1..{MAX_SPLIT} or 'fill'")


# Split-KV: at most this many programs share one query tile's keys. "fill" (what the tuner tries when a
# call's query tiles leave SMs idle) picks as many as fill the SMs once, keeping MIN_SPLIT_STEPS key tiles
# per split so that each program still pipelines its loads.
MAX_SPLIT = 16
MIN_SPLIT_STEPS = 4


def spare_room(programs: int, sms: int) -> int:
    """The tuning class of a launch's fill: the power of two at or below sms / programs (1: the programs fill
    the SMs), at most MAX_SPLIT."""
    room = max(1, min(sms // max(programs, 1), MAX_SPLIT))
    return 1 << (room.bit_length() - 1)


def fill_splits(programs: int, key_steps: int, sms: int) -> int:
    """Splits of each query tile's keys that fill `sms` SMs once: programs * splits <= sms (one more wave
    would cost as much as it gains), each split >= MIN_SPLIT_STEPS of the key_steps key tiles."""
    return max(1, min(sms // max(programs, 1), key_steps // MIN_SPLIT_STEPS, MAX_SPLIT))


# ---------------------------------------------------------------------------------------------------
# Tuning at run time, on the user's GPU. Results are kept per process and, unless
# SAM_SPARSE_TUNE_CACHE=0, in a per-GPU file of the user's cache folder, so the next process compiles
# only the winning config. Nothing tuned ships with the package.
# ---------------------------------------------------------------------------------------------------

_TUNED: Dict[tuple, dict] = {}
_TUNE_LOCK = threading.Lock()
_DISK: Dict[str, Optional[dict]] = {}


def _tune_file(device: torch.device) -> Optional[Path]:
    if os.environ.get("SAM_SPARSE_TUNE_CACHE") == "0" or device.type != "cuda":
        return None
    root = os.environ.get("SAM_SPARSE_CACHE")
    folder = (Path(root).expanduser() if root else Path.home() / ".cache" / "sam-sparse") / "tuning"
    name = torch.cuda.get_device_name(device)
    cap = torch.cuda.get_device_capability(device)
    code = _attn_fwd.src + _split_combine.src + repr(_configs()) + repr((MAX_SPLIT, MIN_SPLIT_STEPS))
    kernel = hashlib.sha256(code.encode()).hexdigest()[:12]
    slug = "".join(c if c.isalnum() else "-" for c in name)
    return folder / f"{slug}-sm{cap[0]}{cap[1]}-triton{triton.__version__}-{kernel}.json"


def _disk_entries(path: Path) -> dict:
    key = str(path)
    if key not in _DISK:
        try:
            _DISK[key] = json.loads(path.read_text())
        except (OSError, ValueError):
            _DISK[key] = {}
    return _DISK[key]


def _disk_store(path: Path, tune_key: str, cfg: dict) -> None:
    entries = _disk_entries(path)
    entries[tune_key] = cfg
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(entries, f, indent=0, sort_keys=True)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only home only costs the next process a re-tune


@contextlib.contextmanager
def parallel_compiles() -> Iterator[bool]:
    """Inside (on this thread): a kernel's warmup hands its compile to a thread pool and returns at once; on exit
    every compile has finished and sits in Triton's cache, so the launches that follow compile nothing. Yields
    False, and changes nothing, where this Triton lacks its async-compile mode or one is already open on this
    thread (its pool takes the compiles). A compile that failed leaves no trace: the launch that needs it
    compiles again and reports. Worker processes, which would not share the GIL, lost: hiera_l's first call took
    13.1 s with 8 of them against 11.7 s without, and their CUDA contexts held 3.1 GB (docs/benchmarks.md, runs
    68-69)."""
    if _async_compile is None or _async_compile.active_mode.get() is not None:
        yield False
        return
    from concurrent.futures import ThreadPoolExecutor

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 16))) as pool:
            with _async_compile.AsyncCompileMode(pool, ignore_errors=True):
                yield True
    finally:
        _drop_failed_compiles()


def _drop_failed_compiles() -> None:
    """Remove the finished compiles that failed from the kernels' caches (Triton keeps one there, and every later
    launch of it would raise its error without compiling again); finalized ones become their kernels."""
    for fn in (_attn_fwd, _split_combine):
        for cache in getattr(fn, "device_caches", {}).values():
            kernels = cache[0]
            for key, k in list(kernels.items()):
                if not isinstance(k, _FutureKernel):
                    continue
                kernel, future = getattr(k, "kernel", None), getattr(k, "future", None)
                if kernel is not None:
                    kernels[key] = kernel
                elif future is not None and future.done() and future.exception() is not None:
                    del kernels[key]  # (newer Tritons remove a failed compile themselves and drop its future)
                # else: still compiling, or done and left for its own mode to finalize (another thread's, open)


def _compile_in_parallel(candidates: List[dict], warmup: Callable[[dict], None]) -> None:
    """Compile the candidates together before timing them one by one (a fresh process tunes several shape classes
    of 2-5 configs each); where that cannot be done, the timing loop compiles them one at a time."""
    try:
        with parallel_compiles() as parallel:
            for cfg in candidates if parallel else ():
                warmup(cfg)
    except Exception:
        pass  # the timing loop compiles (and reports) whatever did not compile here


# A tuning run times every candidate twice, in order and then in reverse, and ranks them by the mean: a
# clock that drifts over the run (a GPU leaving idle after the compiles, warming up, throttling) then
# weighs on every candidate alike. A winner whose two timings differ by more than TUNE_STEADY was timed on
# a GPU that was not steady (another process or the test suite's workers on it, a clock still moving): it
# serves this process but is not written to the disk cache, where it would serve every later process.
TUNE_STEADY = 0.10


# Host-scale launches. At batch 1 a Hiera window block's attention takes the GPU about 12 us (hiera_l's
# 16 x 16 windows) and the host 30-80 us to launch (docs/benchmarks.md, runs 77 and 86): the GPU waits for the
# host, so what a config costs there is its host time as much as its GPU time. A launch whose work (query x key
# pairs x the head-dim columns of both products, over every (sequence, head)) is at most HOST_SCALE_WORK is
# its own tuning class, keeps the pointer-load twins of TMA tiles (about 12 us of host time against 31, run
# 86: no descriptors) and is ranked by max(GPU time, host time of the launch + OP_HOST_US), OP_HOST_US being
# what a call costs the host around the launch (the op's dispatch, its plan lookup, the output's allocation:
# 15-30 us in runs 77 and 86). On a GPU where such launches take longer than that, GPU time decides, as in any
# other class. 4e9 is about 35 us of this kernel on an H200 (hiera_l's 16 x 16 windows: 1.3e9 at batch 1, 12
# us; 1.1e10 at batch 8, 95 us).
HOST_SCALE_WORK = 4e9
OP_HOST_US = 20.0


def host_scale(pairs: int, seqlen_q: int, seqlen_k: int, qk_cols: int, v_cols: int, window: bool = False) -> bool:
    """Whether a launch on a GPU is host-scale: a sequence side of at most 128 tokens (the decoder's, whatever the
    number of prompts, so that its class never depends on it; not a window's), or work = pairs (sequence or
    window, head) x seqlen_q x seqlen_k x (qk_cols + v_cols), the columns each product runs over, of at most
    HOST_SCALE_WORK."""
    if not window and min(seqlen_q, seqlen_k) <= 128:
        return True
    return float(pairs) * seqlen_q * seqlen_k * (qk_cols + v_cols) <= HOST_SCALE_WORK


def host_us(fn: Callable[[], object], calls: int = 30) -> float:
    """Host microseconds per call of fn (a launch), timed without waiting for the device: the host's side of
    a launch while the GPU keeps up."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _time_candidates(candidates: List[dict], bench: Callable[[dict], object]) -> List[tuple]:
    """(mean cost, relative spread of its two timings, config, mean GPU ms) of each candidate that fits this GPU.
    bench(cfg) gives ms, or (cost, GPU ms) where the cost is not GPU time alone (host-scale classes)."""
    times: Dict[int, List[Tuple[float, float]]] = {}
    pair = lambda r: (float(r[0]), float(r[1])) if isinstance(r, tuple) else (float(r), float(r))  # noqa: E731
    for i, cfg in enumerate(candidates):
        try:
            times[i] = [pair(bench(cfg))]
        except triton.runtime.errors.OutOfResources:
            continue  # the config needs more shared memory or registers than this GPU has
    for i in reversed(list(times)):
        times[i].append(pair(bench(candidates[i])))
    out = []
    for i, ((a, ga), (b, gb)) in times.items():
        out.append(((a + b) / 2, abs(a - b) / max(min(a, b), 1e-9), candidates[i], (ga + gb) / 2))
    return out


# Configs whose cost is within TUNE_TIE of the lowest count as tied, and the one of least GPU time among them
# wins. Only host-scale classes have a cost other than GPU time (max(GPU, host + OP_HOST_US)): where every
# candidate waits on the host, their costs differ by the host's noise, and GPU time is what a CUDA graph of the
# same launches (a patched encoder at batch 1, a video frame) pays.
TUNE_TIE = 0.10


def _pick(timings: List[tuple]) -> tuple:
    """The winning (cost, spread, config, gpu) of _time_candidates's list: least GPU time among those tied
    with the lowest cost."""
    low = min(t[0] for t in timings)
    return min((t for t in timings if t[0] <= low * (1 + TUNE_TIE)), key=lambda t: (t[3], t[0]))


def _offered(cfg: dict, candidates: List[dict]) -> bool:
    """Whether a config read from the disk cache is one of this call's candidates. A "fill" split counts when
    its unsplit twin is offered: the calls of one tuning class differ in how many splits fill the SMs (keys
    rounded up to the class's power of two), so a call with too few key tiles to split offers no fill
    candidate, and would otherwise tune the class again and overwrite the entry."""
    if cfg in candidates:
        return True
    return cfg.get("SPLIT_K") == "fill" and {k: v for k, v in cfg.items() if k != "SPLIT_K"} in candidates


def _disk_config(path: Optional[Path], tune_key: tuple, candidates: List[dict]) -> Optional[dict]:
    """The class's config from the disk cache at path, where it is one of this call's candidates (_offered)."""
    cached = _disk_entries(path).get(repr(tune_key)) if path is not None else None
    return cached if cached is not None and _offered(cached, candidates) else None


def _known_config(tune_key: tuple, candidates: List[dict], device) -> List[dict]:
    """[the class's config] where this process or the disk cache knows it (as _tune finds it), else every
    candidate: what the class's first launch will compile."""
    with _TUNE_LOCK:
        hit = _TUNED.get(tune_key) or _disk_config(_tune_file(device), tune_key, candidates)
    return candidates if hit is None else [hit]


def _tune(tune_key: tuple, candidates: List[dict], bench: Optional[Callable[[dict], object]], device,
          warmup: Optional[Callable[[dict], None]] = None) -> dict:
    """The config of a shape class: from this process's table, the disk cache, or by timing every candidate.
    bench None (the interpreter, SAM_SPARSE_AUTOTUNE=0): candidates[0], untimed, recorded all the same, so
    that _TUNED holds one entry per shape class on every path (the tests count them)."""
    with _TUNE_LOCK:
        hit = _TUNED.get(tune_key)
        if hit is not None:
            return hit
        if bench is None:
            _TUNED[tune_key] = candidates[0]
            return candidates[0]
        path = _tune_file(device)
        best = _disk_config(path, tune_key, candidates)
        if best is None and len(candidates) == 1:
            best = candidates[0]  # nothing to choose: no timing, no disk entry
        elif best is None:
            if warmup is not None:
                _compile_in_parallel(candidates, warmup)
            timings = _time_candidates(candidates, bench)
            if not timings:
                raise RuntimeError(f"no launch config of the kernel fits this GPU for {tune_key} (tried {candidates})")
            _, spread, best, _ = _pick(timings)
            if path is not None and spread <= TUNE_STEADY:
                _disk_store(path, repr(tune_key), best)
        _TUNED[tune_key] = best
        return best


# ---------------------------------------------------------------------------------------------------
# Plans
# ---------------------------------------------------------------------------------------------------


def _address_align(element_size: int, strides: tuple) -> int:
    """The largest power of two, at most 16 bytes' worth of elements, that divides every stride: what the
    kernel may assume of each row's start (Triton only assumes it of integers divisible by 16)."""
    align = max(1, 16 // element_size)
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


def _strides(t: Optional[torch.Tensor], n: int, broadcast_first: int = 0) -> tuple:
    if t is None:
        return (0,) * n
    s = list(t.stride())[:n]
    for i in range(broadcast_first):
        if t.shape[i] == 1:
            s[i] = 0  # a size-1 dim of a broadcast layout is shared by every batch / head
    return tuple(s)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


# Q, K, V, Out, WS_O, WS_L, K_PAD, V_PAD, four TMA descriptors, KV_NUM, KV_IDX, REL_H, REL_W, CU_Q, CU_K
_N_TENSORS = 18


def tma_descriptors(k: torch.Tensor, v: torch.Tensor, box: Tuple[int, ...], d0: int, d1: int, dv0: int,
                    dv1: int) -> tuple:
    """Host-side TMA descriptors of K and V, with any 16-byte-aligned strides: one per head-dim chunk (K: D0
    columns, then D1, which the kernel reads from column D1_AT of the same tensor; V: DV0, then DV1 from
    DV1_AT), each a box of `box` keys by the chunk's columns. Sequences: k, v (B, N, Hk, D | DV), box
    (BLOCK_N,); windows: k, v (B, GH, GW, Hk, D), box (rows, WIN_W), whole rows of a window (of PACK windows side
    by side when packed: (rows, PACK * WIN_W)). Reads past the tensor's bounds come back as zeros. The descriptors
    cover the whole tensors, so a call builds them without slicing k and v."""
    def one(t: torch.Tensor, width: int):
        return TensorDescriptor(t, t.shape, t.stride(), [1, *box, 1, width])

    k0, v0 = one(k, d0), one(v, dv0)
    k1 = one(k, d1) if d1 else k0
    v1 = one(v, dv1) if dv1 else v0
    return k0, k1, v0, v1


def key_box(window: Optional[Tuple[int, int]], block_n: int) -> Optional[Tuple[int, ...]]:
    """The keys one TMA load brings per loop step: (BLOCK_N,) of a sequence; in a window, (rows, WIN_W), whole
    rows that tile the window (WIN_W a power of two dividing BLOCK_N, rows dividing WIN_H); None where a window's
    key tile is no such box (14 x 14 windows: those keep pointer loads)."""
    if window is None:
        return (block_n,)
    wh, ww = window
    if ww & (ww - 1) or block_n % ww or wh % (block_n // ww):
        return None
    return (block_n // ww, ww)


_SMS: Dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def tma_eligible(k: torch.Tensor, v: torch.Tensor, d0: int, d1_at: Optional[int] = None,
                 dv: Optional[Tuple[int, int]] = None) -> bool:
    """Whether K and V can be read through TMA: a Hopper-or-later GPU, 16-bit data, unit last stride,
    16-byte-aligned base, other strides and head-dim chunk starts (d0, and d1_at where the second chunk
    overlaps the first; V's (DV0, DV1_AT) in dv when its head dim differs)."""
    if INTERPRET or TensorDescriptor is None or not k.is_cuda or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    if k.dtype not in (torch.float16, torch.bfloat16):
        return False
    es = k.element_size()
    return all(
        t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st * es % 16 == 0 for st in t.stride()[:-1])
        for t in (k, v)
    ) and all(c * es % 16 == 0 for c in (d0, d0 if d1_at is None else d1_at, *(dv or ())))


def _output_standin(q: torch.Tensor) -> torch.Tensor:
    """What a warmup passes for the output: q's dtype and device, allocated as a call's output is (so aligned as
    it is; q itself may be a view at any offset, and the kernel specializes on a pointer's alignment)."""
    return torch.empty((1,), dtype=q.dtype, device=q.device)


def _finished(compiled):
    """A launch's compiled kernel; where its compile was handed to a pool (parallel_compiles, on this or another
    thread) and is still running, once it has finished."""
    return compiled.result() if _FutureKernel is not None and isinstance(compiled, _FutureKernel) else compiled


class KernelPlan:
    """Everything about one launch signature resolved once: the config, the grid, the scalars and
    constexprs, and the compiled kernel. A call allocates the output and launches; nothing else.

    Call with (q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, cu_seqlens_q, cu_seqlens_k[, k_pad,
    v_pad]), None for the absent ones; tensors must have the shapes, strides, dtypes and device the plan
    was made for.
    """

    def __init__(self, grid: Tuple[int, int, int], tail: tuple, config: dict,
                 tma: Optional[tuple] = None, split: Optional["SplitCombine"] = None, v_dim: Optional[int] = None):
        if _N_TENSORS + len(tail) != len(_attn_fwd.arg_names):  # the launcher takes every argument, in order
            raise RuntimeError(f"kernel plan has {_N_TENSORS + len(tail)} arguments, the kernel {len(_attn_fwd.arg_names)}")
        self.grid = grid
        self.config = config
        self._tail = tail  # every argument after the tensors and descriptors, in the kernel's order
        self._tma = tma  # (key box, D0, D1, DV0, DV1) when K and V are read through TMA descriptors (tma_descriptors)
        self.v_dim = v_dim  # the output's head dim (v's), when it is not q's
        self.split = split  # the merge of partial results when the keys are split over programs
        # maxnreg caps registers per thread (spilling a little) so that two CTAs fit on an SM.
        self._options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
        if config.get("maxnreg"):
            self._options["maxnreg"] = config["maxnreg"]
        self._fast = None  # the compiled kernel's launcher, once known
        self.fast_path = False

    def warmup(self, q, k, v, kv_num, kv_idx, rel_h, rel_w, cu_q, cu_k, k_pad=None, v_pad=None) -> None:
        """Compile without launching: the kernel the first call will launch (the same specialization: an output
        allocated as a call's, the other tensors as the call passes them)."""
        ws = self.split.standin(q.device) if self.split is not None else (q, q)
        out = _output_standin(q)
        tensors = self._tensors(q, k, v, out, ws, k_pad, v_pad, kv_num, kv_idx, rel_h, rel_w, cu_q, cu_k, q)
        _attn_fwd.warmup(*tensors, *self._tail, grid=self.grid, **self._options)
        if self.split is not None:
            self.split.warmup(out, cu_q)

    def _tensors(self, q, k, v, out, ws, k_pad, v_pad, kv_num, kv_idx, rel_h, rel_w, cu_q, cu_k, absent) -> tuple:
        """The kernel's tensor arguments, `absent` standing in for those the call lacks (never read: their
        flags are off). Compiling needs a tensor there (Triton would make None a constant); a launch of
        the compiled kernel takes None, which its launcher passes as a null pointer, while a tensor costs
        it a data_ptr() call and a CUDA driver query each (14 of a window call's 18 arguments are absent)."""
        # Descriptors hold addresses, so they are made per call.
        descs = tma_descriptors(k, v, *self._tma) if self._tma is not None else (absent,) * 4
        if ws is None:
            ws = (absent, absent)
        return (q, k, v, out, *ws, absent if k_pad is None else k_pad, absent if v_pad is None else v_pad, *descs,
                absent if kv_num is None else kv_num, absent if kv_idx is None else kv_idx,
                absent if rel_h is None else rel_h, absent if rel_w is None else rel_w,
                absent if cu_q is None else cu_q, absent if cu_k is None else cu_k)

    def _launch_slow(self, tensors: tuple):
        return _attn_fwd[self.grid](*tensors, *self._tail, **self._options)

    def __call__(self, q, k, v, kv_num, kv_idx, rel_h, rel_w, cu_q, cu_k, k_pad=None, v_pad=None, out=None) -> torch.Tensor:
        if out is None:
            # q's shape, not one stored: a varlen plan serves every total length of its shape class.
            shape = q.shape if self.v_dim is None else (*q.shape[:-1], self.v_dim)
            out = torch.empty(shape, dtype=q.dtype, device=q.device)
        ws = self.split.workspace(q.device) if self.split is not None else None
        if self._fast is not None:
            self._fast(*self._tensors(q, k, v, out, ws, k_pad, v_pad, kv_num, kv_idx, rel_h, rel_w, cu_q, cu_k, None),
                       *self._tail)
        else:
            self._first_launch(self._tensors(q, k, v, out, ws, k_pad, v_pad, kv_num, kv_idx, rel_h, rel_w, cu_q, cu_k, q))
        if self.split is not None:
            self.split(ws, out, cu_q)
        return out

    def _first_launch(self, tensors: tuple) -> None:
        compiled = _finished(self._launch_slow(tensors))
        if not INTERPRET and compiled is not None:
            # Triton's own run() binds ~60 arguments, specializes and looks up its cache on every call;
            # the compiled kernel's launcher only packs them. Plans are keyed by everything that run()
            # would check, so the launcher is safe to call directly from now on.
            try:
                self._fast = compiled[self.grid]
                self.fast_path = True
            except Exception:  # a Triton without CompiledKernel[grid]: keep the slow path
                self._fast = None


class SplitCombine:
    """The second launch of a plan whose programs split the keys (split-KV, as flash-decoding): its fp32
    workspace, (n_split * n_bh * ws_rows, DV1_AT + DV1) partial outputs (a row reaches the head-dim chunks'
    last column) and (n_split * n_bh * ws_rows,) row log-sum-exps, and the merge into the output. One
    split program covers 1 / n_split of a query tile's key steps, so a call with few query tiles (one
    object's memory attention: 32 tiles on 132 SMs) fills the GPU."""

    BLOCK = 32  # rows per merge program: 32 x 256 fp32 accumulators at head dim 256

    def __init__(self, n_split: int, n_bh: int, ws_rows: int, out_dim: int, width: int, num_heads: int,
                 seqlen_q: int, varlen: bool, out_strides: tuple):
        self.n_split, self.n_bh, self.ws_rows, self.width = n_split, n_bh, ws_rows, width
        self.grid = (triton.cdiv(seqlen_q, self.BLOCK), n_bh, 1)
        self._tail = (*out_strides, seqlen_q, num_heads, n_split, n_bh, ws_rows,
                      out_dim, width, next_pow2(width), self.BLOCK, varlen)
        self._fast = None

    def workspace(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = self.n_split * self.n_bh * self.ws_rows
        return (torch.empty((rows, self.width), dtype=torch.float32, device=device),
                torch.empty((rows,), dtype=torch.float32, device=device))

    @staticmethod
    def standin(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """fp32 tensors that compile the same kernels as a workspace (warmup only: never read)."""
        one = torch.empty((1,), dtype=torch.float32, device=device)
        return one, one

    def warmup(self, out: torch.Tensor, cu_q: Optional[torch.Tensor]) -> None:
        """Compile without launching; out: the output or its stand-in (_output_standin)."""
        _split_combine.warmup(*self.standin(out.device), out, out if cu_q is None else cu_q, *self._tail,
                              grid=self.grid, num_warps=4)

    def __call__(self, ws: Tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, cu_q: Optional[torch.Tensor]) -> None:
        args = (*ws, out, out if cu_q is None else cu_q)
        if self._fast is not None:
            self._fast(*args, *self._tail)
            return
        compiled = _finished(_split_combine[self.grid](*args, *self._tail, num_warps=4))
        if not INTERPRET and compiled is not None:
            try:  # as KernelPlan: the compiled kernel's own launcher from now on
                self._fast = compiled[self.grid]
            except Exception:
                self._fast = None


class LaunchGroup:
    """Several launches of one call that write disjoint parts of one output (window attention: the
    windows inside the grid, then those that overhang it). Called like a KernelPlan."""

    def __init__(self, plans: List[KernelPlan]):
        self.plans = plans
        self.config = plans[0].config

    @property
    def fast_path(self) -> bool:
        return all(p.fast_path for p in self.plans)

    def warmup(self, *args) -> None:
        for p in self.plans:
            p.warmup(*args)

    def __call__(self, *args, out=None) -> torch.Tensor:
        out = self.plans[0](*args, out=out)  # allocates the output when none is given
        for p in self.plans[1:]:
            p(*args, out=out)
        return out


def make_plan(
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
    max_seqlen_k: Optional[int] = None,
    window: Optional[Tuple[int, int]] = None,
    q_window: Optional[Tuple[int, int]] = None,
    config: Optional[dict] = None,
    ahead: bool = False,
) -> Optional[KernelPlan]:
    """Resolve a launch for validated inputs (interface.py checks them); tunes on first sight of a shape class.

    q: (B, Nq, H, D) or varlen (total_q, H, D); k: (B, Nk, Hk, D) or (total_k, Hk, D); v: the same with its own
    head dim DV (the output's).
    window (wh, ww): q, k, v are (B, GH, GW, H|Hk, D) token grids instead, attended window by window;
        the plan's call then takes k_pad / v_pad (Hk, D) contiguous, the keys and values of padding.
    q_window (qh, qw): the query grid's windows when q lies on another grid than k (a pooled q of
        (B, GHq, GWq, H, D)); window (i, j) of q attends to window (i, j) of k. None: q_window = window.
    kv_num_blocks: int32 (Bm, Hm, QB); kv_indices: int32 (Bm, Hm, QB, KB), last dim contiguous
        (layout.BlockLayout), or None for dense. With a window, Bm is 1 or B * windows.
    rel_h (B, H, Nq, kh), rel_w (B, H, Nq, kw) or None (Nq = GH * GW with a window); key_tile (th, tw)
        or None (raster).
    config: optional fixed launch config {BLOCK_M, BLOCK_N, num_warps, num_stages[, W_DOT, TMA, SPLIT_K, PACK]}: no
        tuning. SPLIT_K: 1..MAX_SPLIT programs per query tile, each over its share of the key steps, or "fill"
        (fill_splits); not with a window.
    ahead (config None): compile what the plan's first call would compile (its class's tuned config where one is
        known, else every candidate, which the tuner will time) and return None: no timing, no launch. Inside
        parallel_compiles() the compiles go to its pool, so the kernels of many calls compile together.

    Varlen (cu_seqlens_q / cu_seqlens_k given): the plan holds nothing of the total lengths or of the
    exact max_seqlen_k (the kernel reads each sequence's bounds from cu_seqlens), so it serves every call
    with the same num_seqs, max_seqlen_q, head layout and max_seqlen_k's length_bucket: the growing
    memories of a video's objects reuse one plan (and one compiled kernel) per bucket. max_seqlen_k (the
    longest key sequence; default: total_k) picks the tuning class.
    """
    varlen = cu_seqlens_q is not None
    grid_hw, q_grid_hw, win_hw, q_win_hw, win_rows, win_cols, n_windows = (1, 1), (1, 1), (1, 1), (1, 1), 1, 1, 1
    launches = [(1, False)]  # (windows per image in the launch, padding windows?)
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q = int(max_seqlen_q)
        seqlen_k = max(int(k.shape[0] if max_seqlen_k is None else max_seqlen_k), 1)  # sizes tiles only
        # (total, H, D) seen as (1, total, H, D) with the batch stride 0: the kernel never reads it in varlen
        # mode, and a stride of total * H * D would tie the plan to one total length.
        q4, k4, v4 = (t.as_strided((1, *t.shape), (0, *t.stride())) for t in (q, k, v))
        extra_strides = (0, 0, 0)
    elif window is not None:
        grid_hw, win_hw = tuple(k.shape[1:3]), tuple(window)
        q_grid_hw, q_win_hw = tuple(q.shape[1:3]), tuple(q_window or window)
        win_rows, win_cols = -(-grid_hw[0] // win_hw[0]), -(-grid_hw[1] // win_hw[1])
        n_windows = win_rows * win_cols
        # Windows inside the grid and windows that overhang it go in separate launches, so that only
        # the latter pay for padding keys.
        inside = (win_rows - (win_rows * win_hw[0] > grid_hw[0])) * (win_cols - (win_cols * win_hw[1] > grid_hw[1]))
        launches = [(n, pad) for n, pad in ((inside, False), (n_windows - inside, True)) if n]
        batch, seqlen_q, seqlen_k = q.shape[0], q_win_hw[0] * q_win_hw[1], win_hw[0] * win_hw[1]
        # (B, GH, GW, H, D) -> the kernel's (b, n = grid row, h, d) strides plus the grid column's.
        q4, k4, v4 = (t.select(2, 0) for t in (q, k, v))
        extra_strides = (q.stride(2), k.stride(2), v.stride(2))
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        q4, k4, v4 = q, k, v
        extra_strides = (0, 0, 0)
    nheads, head_dim, v_dim = q.shape[-2], q.shape[-1], v.shape[-1]
    d0, d1, d1_at = head_dim_chunks(head_dim)
    dv0, dv1, dv1_at = head_dim_chunks(v_dim)
    has_bias = rel_h is not None
    kh, kw = (rel_h.shape[-1], rel_w.shape[-1]) if has_bias else (1, 1)
    tile_h, tile_w = key_tile if key_tile is not None else (kh, kw)
    has_mask = kv_num_blocks is not None
    kb = kv_indices.shape[-1] if has_mask else 1
    a = dict(
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, KH=kh, KW=kw, tile_h=tile_h, tile_w=tile_w,
        D0=d0, D1=d1, D1_AT=d1_at, DV=dv0 + dv1, MASK_BLOCK=block_size, HAS_BIAS=has_bias, VARLEN=varlen,
        WINDOW=window is not None,
        IS_FP32=q.dtype == torch.float32, IS_BF16=q.dtype == torch.bfloat16,
    )
    prec = dot_precision(q.dtype)
    # A config reads K / V through TMA where its key tile is a box (key_box: any tile of a sequence, whole rows of a
    # window). Boxes cover whole chunks: exact splits, or one chunk wider than the head dim (56 as 64 columns,
    # hiera_b+'s), whose columns past the head dim lie outside the descriptor's shape and arrive as zeros, as a
    # masked pointer load gives them (no byte past the head dim is read). A second chunk with masked columns (no
    # such split is made now) stays on pointer loads.
    tma_ok = (not varlen and (d1 == 0 or d1_at + d1 == head_dim) and (dv1 == 0 or dv1_at + dv1 == v_dim)
              and tma_eligible(k, v, d0, d1_at, (dv0, dv1_at)))
    a["TMA_OK"] = tma_ok
    a["WIN_HW"] = win_hw if window is not None else None  # key_box's window
    a["HAS_MASK"] = has_mask
    # Packed windows (a config's PACK): windows that tile the grid exactly (one launch, no padding keys), with
    # neither a block mask nor rel-pos terms; PACK must divide the windows of a grid row.
    exact = window is not None and launches == [(n_windows, False)]
    a["PACK_COLS"] = win_cols if exact and not has_mask and not has_bias else 0
    out_strides = _contiguous_strides((*(q.shape if window is not None else q4.shape)[:-1], v_dim))
    if varlen:
        out_strides = (0, *out_strides[1:])
    if window is not None:
        out_strides, extra_strides = out_strides[:2] + out_strides[3:], extra_strides + (out_strides[2],)
    else:
        extra_strides = extra_strides + (0,)
    # (b, n, h) of q, k, v, out, then each one's grid-column stride; the head-dim strides stay as they are.
    row_strides = (*q4.stride()[:3], *k4.stride()[:3], *v4.stride()[:3], *out_strides[:3], *extra_strides)
    align = _address_align(q.element_size(), row_strides)
    aligned = lambda st: (*(x // align for x in st[:3]), st[3])  # noqa: E731
    scalars = (
        float(softmax_scale),
        *aligned(q4.stride()), *aligned(k4.stride()), *aligned(v4.stride()), *aligned(out_strides),
        *(x // align for x in extra_strides),
        *_strides(kv_num_blocks, 3, 2), *_strides(kv_indices, 3, 2),
        *_strides(rel_h, 4), *_strides(rel_w, 4),
        # varlen: each sequence's lengths come from cu_seqlens; 0 here keeps the plan free of any length
        0 if varlen else seqlen_q, 0 if varlen else seqlen_k, nheads, nheads // k.shape[-2], kh, kw, tile_h, tile_w,
        *grid_hw, *q_grid_hw, win_rows, win_cols, n_windows,
    )

    def splits(cfg: dict) -> int:
        """The key splits of a config on this call: SPLIT_K, or for "fill" what fills the SMs."""
        want = cfg.get("SPLIT_K", 1)
        if want == "fill":
            if not q.is_cuda or window is not None:
                return 1
            programs = triton.cdiv(seqlen_q, cfg["BLOCK_M"]) * batch * nheads
            return fill_splits(programs, triton.cdiv(seqlen_k, cfg["BLOCK_N"]), _sm_count(q.device))
        if want > 1 and window is not None:
            raise ValueError(f"config {cfg}: SPLIT_K applies to sequences, not to window attention")
        return want

    def plan_for(cfg: dict):
        _check_config(cfg, block_size)
        pack = cfg.get("PACK", 1)
        if pack != 1 and not (isinstance(pack, int) and pack > 1 and a["PACK_COLS"] and a["PACK_COLS"] % pack == 0):
            raise ValueError(f"config {cfg}: PACK={pack!r} needs window attention without a block mask or rel-pos terms, "
                             f"on a grid the windows tile exactly, and an int > 1 dividing the windows per grid row "
                             f"({win_cols})")
        dv = _derived(a, cfg)
        packed_win = None if window is None else (win_hw[0], win_hw[1] * pack)  # the key rectangle of one program
        box = key_box(packed_win, cfg["BLOCK_N"]) if cfg.get("TMA") and tma_ok else None
        tma = box is not None
        n_split = splits(cfg)
        q_tiles = triton.cdiv(seqlen_q * pack, cfg["BLOCK_M"])
        tail_ok = TAIL_KEYS and window is not None and _sized_by_hand(a) and not (has_mask or has_bias or tma or pack > 1)
        plans = []
        for n_launch, pad in launches:
            n_launch //= pack
            n_bh = batch * n_launch * nheads
            # Cropped windows hold fewer keys than a full one, in rows of their own width: no key box, no even tiles.
            crop = (pad and CROP_WINDOWS and not has_mask and not has_bias
                    and max(seqlen_q, seqlen_k) + max(cfg["BLOCK_M"], cfg["BLOCK_N"]) <= CROP_MAX_TOKENS)
            tail_n = _tail_keys(seqlen_k, cfg["BLOCK_N"]) if tail_ok and not pad else 0
            tail = scalars + (
                n_launch, n_bh, n_split, q_tiles * cfg["BLOCK_M"],
                head_dim, d0, d1, d1_at, v_dim, dv0, dv1, dv1_at, block_size, max(16, next_pow2(kb)), has_mask,
                has_bias, varlen,
                window is not None, *win_hw, *q_win_hw, pad, crop, pack, prec, INTERPRET,
                dv["BLOCK_M"], dv["BLOCK_N"], dv["BIAS_PATH"], dv["RECT_H"], dv["RECT_W"], dv["W_HOIST"],
                dv["USE_WDOT"], dv["KH_P"], dv["KW_P"], (dv["EVEN_N"] or tail_n > 0) and not crop, tail_n,
                tma and not crop, align, n_split > 1,
            )
            grid = (q_tiles * n_split, min(n_bh, MAX_GRID_Y), triton.cdiv(n_bh, MAX_GRID_Y))
            combine = None
            if n_split > 1:
                if n_bh > MAX_GRID_Y:
                    raise ValueError(f"config {cfg}: SPLIT_K over {n_bh} (sequence, head) pairs (at most {MAX_GRID_Y})")
                combine = SplitCombine(n_split, n_bh, q_tiles * cfg["BLOCK_M"], v_dim, dv1_at + dv1, nheads, seqlen_q,
                                       varlen, out_strides[:4])
            plans.append(KernelPlan(grid, tail, cfg, (box, d0, d1, dv0, dv1) if tma and not crop else None, combine,
                                    v_dim if v_dim != head_dim else None))
        return plans[0] if len(plans) == 1 else LaunchGroup(plans)

    if config is not None:
        return plan_for({"W_DOT": 0, **config})

    # The tuning key holds shape classes, not exact sizes: no batch, sequence lengths rounded up to a
    # power of two, so a new prompt count never starts a tuning run inside predict(), and a video's memory
    # growing by a frame per call tunes once per bucket (4096, 16384, 32768 keys). Two things of the batch
    # are in it: whether the launch is host-scale (host_scale: HOST_SCALE_WORK; a sequence side of at most 128
    # tokens, the decoder's, always is, whatever the number of prompts) and the SMs it leaves idle (room, below).
    timed = not INTERPRET and os.environ.get("SAM_SPARSE_AUTOTUNE") != "0"
    # Whether and how far this problem packs its windows (not the grid's width: windows that never pack share a class).
    # A window's token counts are exact in the tuning key (window, q_window): packing reads them unbucketed.
    packed = _pack_configs(a)
    pack_key = packed[0]["PACK"] if packed else 0
    # From the bucketed lengths: a varlen plan serves every max_seqlen_k of its bucket (interface._varlen_key).
    sq, sk = length_bucket(seqlen_q), length_bucket(seqlen_k)
    small = q.is_cuda and host_scale(batch * n_windows * nheads, sq, sk, d0 + d1, dv0 + dv1, window is not None)
    bucketed = {**a, "seqlen_q": sq, "seqlen_k": sk, "HOST_SCALE": small}
    # How far 128-row tiles of every (sequence, head) leave the GPU's SMs idle: one object's memory attention
    # (one head, 4096 queries: 32 tiles on an H200's 132 SMs, room for 4 splits of the keys) is best served by
    # other configs than 3 objects' (96 tiles) or 16 objects' (512), so each gets its own (so may a Hiera
    # global block of 4 heads at batch 1 and at batch 4). A side of at most 128 queries (the decoder's
    # tokens) has one tile whatever the batch and keeps one class, so a new number of prompts still never
    # tunes inside predict().
    room = 1
    if q.is_cuda and seqlen_q > 128:
        room = spare_room(batch * launches[0][0] * nheads * triton.cdiv(seqlen_q, 128), _sm_count(q.device))
    tune_key = (bucketed["seqlen_q"], bucketed["seqlen_k"], nheads, kh, kw, tile_h, tile_w, d0, d1, d1_at, dv0, dv1,
                dv1_at, block_size,
                has_mask, has_bias, varlen, str(q.dtype), prec, window, q_window, pack_key, tma_ok, timed, room,
                small)
    if not timed and not ahead:
        return plan_for({"W_DOT": 0, **_tune(tune_key, [_fixed_config(bucketed)], None, q.device)})
    pads = (k.new_zeros(k.shape[-2:]),) * 2 if window is not None else (None, None)  # stand-ins for tuning
    tensors_in = (q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, cu_seqlens_q, cu_seqlens_k, *pads)
    if not timed:  # ahead: the config _tune picks untimed
        plan_for({"W_DOT": 0, **_TUNED.get(tune_key, _fixed_config(bucketed))}).warmup(*tensors_in)
        return None
    candidates = packed or _prune(_configs(), bucketed)
    if room > 1:
        # Idle SMs: each config also split over the keys, where that fills them.
        candidates += [{**c, "SPLIT_K": "fill"} for c in candidates if splits({**c, "SPLIT_K": "fill"}) > 1]
    if ahead:
        for cfg in _known_config(tune_key, candidates, q.device):
            plan_for(cfg).warmup(*tensors_in)
        return None

    def bench(cfg: dict):
        """The config's GPU ms, or for a host-scale launch (max(GPU, host + OP_HOST_US), GPU) in ms."""
        p = plan_for(cfg)
        scratch = q.new_empty((*q.shape[:-1], v_dim))  # the output's shape: v's head dim
        call = lambda: p(*tensors_in, out=scratch)  # noqa: E731
        gpu = triton.testing.do_bench(call, warmup=5, rep=10, return_mode="median")
        if not small:
            return gpu
        return max(gpu, (host_us(call) + OP_HOST_US) / 1e3), gpu

    def warmup(cfg: dict) -> None:
        plan_for(cfg).warmup(*tensors_in)

    return plan_for(_tune(tune_key, candidates, bench, q.device, warmup))


def attention_triton(q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, key_tile, softmax_scale, block_size, *,
                     cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, window=None,
                     q_window=None, k_pad=None, v_pad=None, out=None, config=None) -> torch.Tensor:
    """One launch without the plan cache (tests and probes): make_plan's arguments, then the plan's call.

    out: optional preallocated output shaped and typed like q (tests poison it to catch unwritten rows).
    """
    plan = make_plan(q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, key_tile, softmax_scale, block_size,
                     cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                     max_seqlen_k=max_seqlen_k, window=window, q_window=q_window, config=config)
    return plan(q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, cu_seqlens_q, cu_seqlens_k, k_pad, v_pad, out=out)
