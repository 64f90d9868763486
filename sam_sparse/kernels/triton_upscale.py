"""Triton kernel for a 4x upscaling head, and its launcher: two 2x2 stride-2 transposed convolutions (the
first followed by a LayerNorm over channels and GELU, the second by GELU), each optionally plus a skip
map, then M per-sample linear projections of the upscaled channels, fused so that neither upscaled
feature map is ever written.

For input pixel (y, x) of an h x w grid, first-stage sub-pixel (a, d) and second-stage sub-pixel (c, e),
with Y = 2y + a, X = 2x + d:

    u = gelu(layer_norm(w1[:, :, a, d]^T x[b, y * w + x] + b1 + add1[b, :, Y, X]))     (C1,)
    v = gelu(w2[:, :, c, e]^T u + b2 + add2[b, :, 2Y + c, 2X + e])                   (C2,)
    out[b, m, 2Y + c, 2X + e] = hyper[b, m] . v

One program takes BLOCK_P input pixels of one sample. For each of the 4 first-stage sub-pixels it forms
the (BLOCK_P, C1) product on the tensor cores (a K loop over C in BLOCK_K chunks), normalizes it and, for
each of the 4 second-stage sub-pixels, forms (BLOCK_P, C2) and the M projections as one small product. x is
read once per first-stage sub-pixel (the later reads hit L2); only the (B, M, 4h, 4w) result is written.
Unfused, the two maps are (B, C1, 2h, 2w) and (B, C2, 4h, 4w) floats written and read by five kernels:
for a 64 x 64 x 256 input with C1 = 64, C2 = 32 and B = 1024, 4 and 8 GiB.

float32 products follow the precision torch gives the same unfused ops: the two convolutions' TF32 where
torch.backends.cudnn.allow_tf32 (the default, as cuDNN runs ConvTranspose2d), the projections'
torch.get_float32_matmul_precision() (triton_util.dot_precision: "highest" runs 3xTF32, float32-level
error; "high" / "medium" TF32). Launch configs are tuned at run time per
(h*w, C, C1, C2, M, dtypes) over the configs that fit the shape (triton.autotune with `prune`; nothing
stored on disk): the first call at a new shape compiles and times up to 7 configs.

Shapes: x (B, h*w, C), any strides, float32 / float16 / bfloat16 (computed in float32); packed
weights w1 (4, C, C1) and w2 (4, C1, C2) with sub-pixel s = 2 * row + col, b1 / ln_weight / ln_bias
(C1,), b2 (C2,), hyper (B, M, C2), all float32 and contiguous; optional add1 (B | 1, C1, 2h, 2w) and
add2 (B | 1, C2, 4h, 4w), any strides (a size-1 batch is shared); out (B, M, 4h, 4w) float32.
C a multiple of 16; C1 and C2 powers of two from 16 to 128; M <= 64.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_util import INTERPRET, MAX_GRID_Y, conv_precision, dot_precision, next_pow2

# The tuning space: (pixels per program, K step over C, warps). Kept to the ones ptxas fits in 255
# registers with no or little spilling at a 256 -> 64 -> 32 head in 3xTF32 on sm_90 (the float32 operands'
# split parts and the (BLOCK_P, C1) LayerNorm tile are what fill them; tests/test_upscale_kernel.py compiles
# them offline). The K loop is C / BLOCK_K steps long, so pipelining depth is fixed.
CONFIGS = [triton.Config({"BLOCK_P": p, "BLOCK_K": k}, num_warps=w, num_stages=2)
           for p, k, w in ((32, 64, 4), (32, 64, 8), (32, 32, 8), (64, 32, 8), (64, 16, 4), (64, 16, 8), (128, 16, 8))]
# One config in the interpreter, which would otherwise "time" every one of them.
INTERPRETER_CONFIG = triton.Config({"BLOCK_P": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)


def prune(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    """The configs that fit a call (triton.autotune's early_config_prune: positional arguments in
    named_args, constexprs in kwargs): BLOCK_K divides C (the K loop has no tail), BLOCK_P no larger than
    the pixels need; the smallest tile when none is left."""
    args = {**named_args, **kwargs}
    c, hw = args["C"], args["HW"]
    fits = [cfg for cfg in configs if c % cfg.kwargs["BLOCK_K"] == 0]
    keep = [cfg for cfg in fits if cfg.kwargs["BLOCK_P"] <= max(32, next_pow2(hw))]
    return keep or fits[:1]


@triton.jit
def _gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))  # erf GELU; z / sqrt(2)


@triton.autotune(configs=[INTERPRETER_CONFIG] if INTERPRET else CONFIGS,
                 key=["HW", "C", "C1", "C2", "M", "HAS_ADD1", "HAS_ADD2", "CONV_PREC", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": prune})
@triton.jit
def _upscale_kernel(
    X, W1, B1, LNW, LNB, W2, B2, HYP, OUT, ADD1, ADD2,
    stride_xb, stride_xp, stride_xc, stride_hb, stride_hm, stride_ob, stride_om,
    stride_1b, stride_1c, stride_1h, stride_1w, stride_2b, stride_2c, stride_2h, stride_2w,
    HW, GW, eps,
    C: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, M: tl.constexpr, M_P: tl.constexpr,
    HAS_ADD1: tl.constexpr, HAS_ADD2: tl.constexpr, CONV_PREC: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < HW
    py = offs_p // GW
    px = offs_p % GW
    offs_k = tl.arange(0, BLOCK_K)
    c1 = tl.arange(0, C1)
    c2 = tl.arange(0, C2)
    mm = tl.arange(0, M_P)
    x_rows = X + b * stride_xb + offs_p[:, None] * stride_xp
    out_w = 4 * GW
    # The M projections as one (BLOCK_P, C2) @ (C2, M_P) product, M padded with zero columns: M row sums of
    # v * hyper[m] across the MMA layout took every register (ptxas: 255 and spills at any tile size).
    hyp_t = tl.load(HYP + b * stride_hb + mm[None, :] * stride_hm + c2[:, None], mask=mm[None, :] < M, other=0.0)
    out_tile = OUT + b * stride_ob + mm[None, :] * stride_om
    out_ok = p_ok[:, None] & (mm[None, :] < M)
    for s1 in range(4):
        acc = tl.zeros((BLOCK_P, C1), dtype=tl.float32)
        for k0 in range(0, C, BLOCK_K):
            xk = tl.load(x_rows + (k0 + offs_k)[None, :] * stride_xc, mask=p_ok[:, None], other=0.0).to(tl.float32)
            wk = tl.load(W1 + s1 * C * C1 + (k0 + offs_k)[:, None] * C1 + c1[None, :])
            acc = tl.dot(xk, wk, acc, input_precision=CONV_PREC)
        acc += tl.load(B1 + c1)[None, :]
        y1 = 2 * py + s1 // 2
        x1 = 2 * px + s1 % 2
        if HAS_ADD1:
            acc += tl.load(ADD1 + b * stride_1b + c1[None, :] * stride_1c + y1[:, None] * stride_1h
                           + x1[:, None] * stride_1w, mask=p_ok[:, None], other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=1) / C1
        centred = acc - mean[:, None]
        var = tl.sum(centred * centred, axis=1) / C1
        u = centred / tl.sqrt(var + eps)[:, None]
        u = _gelu(u * tl.load(LNW + c1)[None, :] + tl.load(LNB + c1)[None, :])
        for s2 in range(4):
            w2 = tl.load(W2 + s2 * C1 * C2 + c1[:, None] * C2 + c2[None, :])
            v = tl.dot(u, w2, input_precision=CONV_PREC) + tl.load(B2 + c2)[None, :]
            row = 2 * y1 + s2 // 2
            col = 2 * x1 + s2 % 2
            if HAS_ADD2:
                v += tl.load(ADD2 + b * stride_2b + c2[None, :] * stride_2c + row[:, None] * stride_2h
                             + col[:, None] * stride_2w, mask=p_ok[:, None], other=0.0).to(tl.float32)
            o = tl.dot(_gelu(v), hyp_t, input_precision=DOT_PREC)
            tl.store(out_tile + (row * out_w + col)[:, None], o, mask=out_ok)


def pack_weights(w1: torch.Tensor, w2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """ConvTranspose2d weights (C, C1, 2, 2) and (C1, C2, 2, 2) -> (4, C, C1) and (4, C1, C2) float32,
    sub-pixel s = 2 * row + col first."""
    return tuple(w.float().permute(2, 3, 0, 1).reshape(4, w.shape[0], w.shape[1]).contiguous() for w in (w1, w2))


def upscale_project_triton(x: torch.Tensor, grid: Tuple[int, int], w1p: torch.Tensor, b1: torch.Tensor,
                           ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, w2p: torch.Tensor,
                           b2: torch.Tensor, hyper: torch.Tensor, add1: Optional[torch.Tensor] = None,
                           add2: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel on checked inputs (upscale.upscale_project checks them): x (B, h*w, C), packed weights
    (pack_weights), float32 contiguous vectors, hyper (B, M, C2) float32 contiguous, add1 / add2 None or
    (B | 1, C1, 2h, 2w) / (B | 1, C2, 4h, 4w) -> (B, M, 4h, 4w). out: a contiguous float32 (B, M, 4h, 4w)
    to write into (tests fill it with NaN first)."""
    B, hw, C = x.shape
    h, w = grid
    C1, C2, M = w1p.shape[2], w2p.shape[2], hyper.shape[1]
    if out is None:
        out = torch.empty((B, M, 4 * h, 4 * w), dtype=torch.float32, device=x.device)
    if B == 0 or hw == 0 or M == 0:
        return out
    def skip(t: Optional[torch.Tensor], start: int):
        if t is None:
            return x, (0, 0, 0, 0)  # x stands in for an absent map; never read
        strides = list(t.stride())
        if t.shape[0] == 1:
            return t, tuple([0] + strides[1:])  # one map for every sample
        return t[start:], tuple(strides)

    for start in range(0, B, MAX_GRID_Y):  # samples run on the grid's second axis
        n = min(MAX_GRID_Y, B - start)
        (a1, s1), (a2, s2) = skip(add1, start), skip(add2, start)
        launch = lambda meta: (triton.cdiv(hw, meta["BLOCK_P"]), n)  # noqa: E731
        _upscale_kernel[launch](
            x[start:start + n], w1p, b1, ln_weight, ln_bias, w2p, b2, hyper[start:start + n], out[start:start + n],
            a1, a2, x.stride(0), x.stride(1), x.stride(2), hyper.stride(0), hyper.stride(1), out.stride(0),
            out.stride(1), *s1, *s2, hw, w, float(eps), C=C, C1=C1, C2=C2, M=M, M_P=max(16, next_pow2(M)),
            HAS_ADD1=add1 is not None,
            HAS_ADD2=add2 is not None, CONV_PREC=conv_precision(torch.float32), DOT_PREC=dot_precision(torch.float32),
        )
    return out
