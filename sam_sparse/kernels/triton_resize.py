"""Triton kernel for bilinear resizing of many single-channel maps followed by a threshold, and its
launcher: either per-map statistics of the resized map (two counts and a bounding box) or the thresholded
map written as bytes, without the resized float map ever being written.

The resize is torch's F.interpolate(mode="bilinear", align_corners=False), once or twice:
  one step   (h, w) -> (H, W)
  two steps  (h, w) -> (MH, MW), the top-left (CH, CW) of that kept, -> (H, W)
For an output index d of a step from n_in to n_out samples, torch's source position is
s = max(scale * (d + 0.5) - 0.5, 0) with scale = float32(n_in) / n_out, its neighbours i0 = int(s) and
i1 = i0 + (i0 < n_in - 1), weights 1 - (s - i0) and s - i0, blended as
l0 * (m0 * x[i0, j0] + m1 * x[i0, j1]) + l1 * (m0 * x[i1, j0] + m1 * x[i1, j1]); so here, in float32. In two
steps each of an output pixel's four neighbours in the middle grid is itself blended from the input, so
a pixel reads 16 input values (L1/L2 hits: a 256 x 256 map is 256 KiB). Results agree with torch's to
float32 rounding (the compilers may contract a product and a sum into an FMA differently; on SAM's
logits on the H200 no pixel fell on another side of 0 than with torch's resize, docs/benchmarks.md run 50).
There it took 11 ms per photo of SAM's defaults where torch's resizes took 13 plus the scoring (run 47).

One program takes a BLOCK_Y x BLOCK_X tile of one map. STATS: it counts the pixels above t_hi and above
t_lo and finds the rows and columns with a pixel above `threshold`, and adds them to the map's six int32
accumulators with atomics (count_hi, count_lo, W - left, H - top, right + 1, bottom + 1: all 0 for a map
with no such pixel, so the accumulators start at zero). Otherwise it stores (value > threshold) as a byte
at out[dest[k], oy + y, ox + x].

Launch configs are tuned at run time per (steps, STATS, output at least WIDE columns or not) over the
tiles that fit (triton.autotune with `prune`, accumulators reset between trials; nothing stored on disk):
at most four tunings per process, so photos of many sizes do not each pay one (keyed on the width class
of every image, 20 photos of 6 classes spent ~0.6 s per new class). Sizes and strides are not
specialized on, so a new image size reuses the compiled kernels.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .triton_util import INTERPRET, MAX_GRID_Y

CONFIGS = [triton.Config({"BLOCK_Y": y, "BLOCK_X": x}, num_warps=w)
           for y, x, w in ((4, 128, 4), (8, 128, 4), (16, 128, 8), (8, 64, 4), (16, 64, 4), (8, 256, 8))]
INTERPRETER_CONFIG = triton.Config({"BLOCK_Y": 8, "BLOCK_X": 16}, num_warps=4)
STATS_FIELDS = 6  # count_hi, count_lo, W - left, H - top, right + 1, bottom + 1
SIZE_ARGS = ["h", "w", "MH", "MW", "CH", "CW", "H", "W", "oy", "ox",
             "stride_xk", "stride_xy", "stride_xx", "stride_ok", "stride_oy", "stride_ox"]
WIDE = 256  # outputs at least this wide tune apart from narrower ones, which get no 256-wide tile


def prune(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    """The tiles that fit the output's width class: all for WIDE outputs, those under WIDE columns for
    narrower ones."""
    if kwargs.get("IS_WIDE", named_args.get("IS_WIDE")):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_X"] < WIDE] or configs[:1]


@triton.jit
def _source(d, scale, n_in):
    """torch's bilinear source indices and weights for output indices d (int32 vector)."""
    s = scale * (d.to(tl.float32) + 0.5) - 0.5
    s = tl.maximum(s, 0.0)
    i0 = s.to(tl.int32)  # s >= 0: truncation is floor
    i1 = i0 + (i0 < n_in - 1).to(tl.int32)
    l1 = s - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _blend(base, stride_y, stride_x, i0, i1, l0, l1, j0, j1, m0, m1):
    """The bilinear value at rows (i0, i1, l0, l1) (BLOCK_Y,) x columns (j0, j1, m0, m1) (BLOCK_X,)."""
    r0 = base + i0.to(tl.int64)[:, None] * stride_y
    r1 = base + i1.to(tl.int64)[:, None] * stride_y
    c0 = j0.to(tl.int64)[None, :] * stride_x
    c1 = j1.to(tl.int64)[None, :] * stride_x
    x00 = tl.load(r0 + c0).to(tl.float32)
    x01 = tl.load(r0 + c1).to(tl.float32)
    x10 = tl.load(r1 + c0).to(tl.float32)
    x11 = tl.load(r1 + c1).to(tl.float32)
    return l0[:, None] * (m0[None, :] * x00 + m1[None, :] * x01) + l1[:, None] * (m0[None, :] * x10 + m1[None, :] * x11)


@triton.jit
def _mid_value(base, stride_y, stride_x, r, c, sy1, sx1, h, w):
    """Middle-grid values at rows r (BLOCK_Y,) x columns c (BLOCK_X,), blended from the input."""
    i0, i1, l0, l1 = _source(r, sy1, h)
    j0, j1, m0, m1 = _source(c, sx1, w)
    return _blend(base, stride_y, stride_x, i0, i1, l0, l1, j0, j1, m0, m1)


@triton.autotune(configs=[INTERPRETER_CONFIG] if INTERPRET else CONFIGS, key=["TWO_STEPS", "STATS", "IS_WIDE"],
                 prune_configs_by={"early_config_prune": prune}, reset_to_zero=["ACC"])
@triton.jit(do_not_specialize=SIZE_ARGS)
def _resize_kernel(
    X, OUT, DEST, ACC,
    stride_xk, stride_xy, stride_xx, stride_ok, stride_oy, stride_ox,
    h, w, MH, MW, CH, CW, H, W, oy, ox,  # MH, MW unread: the scales sy1, sx1 carry them
    sy1, sx1, sy2, sx2, threshold, t_hi, t_lo,
    TWO_STEPS: tl.constexpr, STATS: tl.constexpr, IS_WIDE: tl.constexpr,
    BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.program_id(1).to(tl.int64)
    tiles_x = tl.cdiv(W, BLOCK_X)
    ys = (pid // tiles_x) * BLOCK_Y + tl.arange(0, BLOCK_Y)
    xs = (pid % tiles_x) * BLOCK_X + tl.arange(0, BLOCK_X)
    y_ok = ys < H
    x_ok = xs < W
    base = X + k * stride_xk
    # Rows and columns past the edge compute the last one's value (every read in bounds); never counted.
    yc = tl.minimum(ys, H - 1)
    xc = tl.minimum(xs, W - 1)
    if TWO_STEPS:
        r0, r1, a0, a1 = _source(yc, sy2, CH)
        c0, c1, b0, b1 = _source(xc, sx2, CW)
        m00 = _mid_value(base, stride_xy, stride_xx, r0, c0, sy1, sx1, h, w)
        m01 = _mid_value(base, stride_xy, stride_xx, r0, c1, sy1, sx1, h, w)
        m10 = _mid_value(base, stride_xy, stride_xx, r1, c0, sy1, sx1, h, w)
        m11 = _mid_value(base, stride_xy, stride_xx, r1, c1, sy1, sx1, h, w)
        v = a0[:, None] * (b0[None, :] * m00 + b1[None, :] * m01) + a1[:, None] * (b0[None, :] * m10 + b1[None, :] * m11)
    else:
        v = _mid_value(base, stride_xy, stride_xx, yc, xc, sy2, sx2, h, w)
    ok = y_ok[:, None] & x_ok[None, :]
    on = (v > threshold) & ok
    if STATS:
        acc = ACC + k * 6  # STATS_FIELDS
        tl.atomic_add(acc, tl.sum(tl.sum(((v > t_hi) & ok).to(tl.int32), axis=1), axis=0))
        tl.atomic_add(acc + 1, tl.sum(tl.sum(((v > t_lo) & ok).to(tl.int32), axis=1), axis=0))
        row_on = tl.max(on.to(tl.int32), axis=1) > 0
        col_on = tl.max(on.to(tl.int32), axis=0) > 0
        tl.atomic_max(acc + 2, tl.max(tl.where(col_on, W - xs, 0), axis=0))
        tl.atomic_max(acc + 3, tl.max(tl.where(row_on, H - ys, 0), axis=0))
        tl.atomic_max(acc + 4, tl.max(tl.where(col_on, xs + 1, 0), axis=0))
        tl.atomic_max(acc + 5, tl.max(tl.where(row_on, ys + 1, 0), axis=0))
    else:
        dest = tl.load(DEST + k).to(tl.int64)
        ptr = (OUT + dest * stride_ok + (oy + ys).to(tl.int64)[:, None] * stride_oy
               + (ox + xs).to(tl.int64)[None, :] * stride_ox)
        tl.store(ptr, on.to(tl.int8), mask=ok)


def _scale(n_in: int, n_out: int) -> float:
    """torch's source-to-destination scale, float32(n_in) / n_out in float32 (exact as a Python float)."""
    return float(np.float32(n_in) / np.float32(n_out))


def resize_threshold_triton(x: torch.Tensor, size: Tuple[int, int], mid: Optional[Tuple[int, int, int, int]],
                            threshold: float, offset: Optional[float] = None, out: Optional[torch.Tensor] = None,
                            dest: Optional[torch.Tensor] = None, origin: Tuple[int, int] = (0, 0)):
    """The kernel on checked inputs (resize.py checks them): x (K, h, w) float32 / float16 / bfloat16, any
    strides; size (H, W); mid None or (MH, MW, CH, CW).

    offset given (statistics): returns the (K, 6) int32 accumulators (STATS_FIELDS). Otherwise writes
    (value > threshold) into out (N, *, *) bool at out[dest[k], oy + y, ox + x] (dest (K,) int64 on x's device)
    and returns out.
    """
    K, h, w = x.shape
    H, W = size
    if mid is None:
        MH, MW, CH, CW = h, w, h, w
        sy1 = sx1 = 1.0
        sy2, sx2 = _scale(h, H), _scale(w, W)
    else:
        MH, MW, CH, CW = mid
        sy1, sx1 = _scale(h, MH), _scale(w, MW)
        sy2, sx2 = _scale(CH, H), _scale(CW, W)
    stats = offset is not None
    # Without statistics the kernel still gets an accumulator, which the tuner zeroes between trials.
    acc = torch.zeros((K if stats else 1, STATS_FIELDS), dtype=torch.int32, device=x.device)
    if K == 0 or H == 0 or W == 0:
        return acc if stats else out
    # A float32 threshold, as torch compares a float32 tensor with a Python float.
    t = lambda v: float(np.float32(v))  # noqa: E731
    t_hi, t_lo = (t(threshold + offset), t(threshold - offset)) if stats else (0.0, 0.0)
    out_bytes = out.view(torch.uint8) if out is not None else x  # x stands in for an absent output; never written
    o_strides = tuple(out.stride()) if out is not None else (0, 0, 0)
    for start in range(0, K, MAX_GRID_Y):  # maps run on the grid's second axis
        n = min(MAX_GRID_Y, K - start)
        launch = lambda meta: (triton.cdiv(H, meta["BLOCK_Y"]) * triton.cdiv(W, meta["BLOCK_X"]), n)  # noqa: E731
        _resize_kernel[launch](
            x[start:start + n], out_bytes, x if dest is None else dest[start:start + n],
            acc[start:start + n] if stats else acc, x.stride(0), x.stride(1), x.stride(2), *o_strides,
            h, w, MH, MW, CH, CW, H, W, origin[0], origin[1], sy1, sx1, sy2, sx2, t(threshold), t_hi, t_lo,
            TWO_STEPS=mid is not None, STATS=stats, IS_WIDE=W >= WIDE,
        )
    return acc if stats else out
