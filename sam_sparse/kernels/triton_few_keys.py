"""Triton kernel for attention of many query rows to a few keys per sample, with the residual add and a
LayerNorm fused, and its launcher.

For sample b, query row n, H heads of T keys (k and v already in the queries' and the outputs' channel
space):

    s[h, t] = scale * (q[b, n] . k[b, h, t]) + k_bias[b, h, t]
    o       = sum_h sum_t softmax_t(s[h, :])[t] * v[b, h, t] + out_bias                     (C,)
    y[b, n] = layer_norm(residual[b, n] + o) * ln_weight + ln_bias;   y_pos[b, n] = y[b, n] + pos[b, n]

One program takes BLOCK_N rows of one sample: the (BLOCK_N, H * T_P) scores as one product over C (a K
loop in BLOCK_C chunks), each head's softmax on the tile seen as (BLOCK_N, H, T_P) (T padded to T_P with
-inf scores), the (BLOCK_N, C) output as one product with the (H * T_P, C) values, then the LayerNorm with
the whole row in registers. Only y and y_pos are written. Unfused, for B = 1024 samples of 4096 rows of 256
channels, the scores, their softmax, the attention output, the sum and y are each a tensor written and
read again (the (B, N, C) ones 4 GiB each).

float32 products follow torch.get_float32_matmul_precision() (triton_util.dot_precision): "highest" runs
3xTF32 (float32-level error), "high" / "medium" TF32. Launch configs are tuned at run time per
(N, C, H * T_P, flags) over the configs that fit (triton.autotune with `prune`; nothing stored on disk).

Shapes: q (1 | B, N, C), residual (1 | B, N, C), pos (1 | B, N, C): any strides, any float dtype (computed
in float32); k, v (B, H, T, C) float32 contiguous; k_bias (B, H, T), out_bias / ln_weight / ln_bias (C,)
float32 contiguous; y, y_pos (B, N, C) float32. C a power of two from 16 to 256; H * T_P <= 128.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_util import INTERPRET, MAX_GRID_Y, dot_precision, next_pow2

# The tuning space: (rows per program, K step over C, warps; the last for C = 16). The (BLOCK_N, C) output
# row tile lives in registers for the LayerNorm: at 4 warps or 128 rows ptxas spilled at C = 256 in 3xTF32;
# these fit (226-240 registers, no spills; tests/hopper_compile.py compiles them for sm_90 offline).
CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_C": c}, num_warps=w, num_stages=2)
           for n, c, w in ((32, 64, 8), (32, 32, 8), (64, 64, 8), (64, 32, 8), (32, 16, 8))]
# One config in the interpreter, which would otherwise "time" every one of them.
INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_C": 16}, num_warps=4, num_stages=1)


def prune(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    """The configs that fit a call (triton.autotune's early_config_prune): BLOCK_C divides C, BLOCK_N no
    larger than the rows need; the smallest tile when none is left."""
    args = {**named_args, **kwargs}
    c, n = args["C"], args["N"]
    fits = [cfg for cfg in configs if c % cfg.kwargs["BLOCK_C"] == 0]
    keep = [cfg for cfg in fits if cfg.kwargs["BLOCK_N"] <= max(32, next_pow2(n))]
    return keep or fits[:1]


@triton.autotune(configs=[INTERPRETER_CONFIG] if INTERPRET else CONFIGS,
                 key=["N", "C", "H", "T_P", "HAS_KB", "HAS_OB", "HAS_POS", "DOT_PREC"],
                 prune_configs_by={"early_config_prune": prune})
@triton.jit
def _few_keys_kernel(
    Q, K, KB, V, OB, R, LNW, LNB, POS, Y, YP,
    stride_qb, stride_qn, stride_qc, stride_rb, stride_rn, stride_rc, stride_pb, stride_pn, stride_pc,
    N, scale, eps,
    C: tl.constexpr, H: tl.constexpr, T: tl.constexpr, T_P: tl.constexpr,
    HAS_KB: tl.constexpr, HAS_OB: tl.constexpr, HAS_POS: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    j = tl.arange(0, H * T_P)  # score column: head j // T_P, key j % T_P (padding where >= T)
    j_ok = (j % T_P) < T
    key = (j // T_P) * T + j % T  # its row in the (H * T, C) keys and values of sample b
    offs_c = tl.arange(0, BLOCK_C)
    s = tl.zeros((BLOCK_N, H * T_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        qc = tl.load(Q + b * stride_qb + offs_n[:, None] * stride_qn + (c0 + offs_c)[None, :] * stride_qc,
                     mask=n_ok[:, None], other=0.0).to(tl.float32)
        kc = tl.load(K + b * H * T * C + key[None, :] * C + (c0 + offs_c)[:, None], mask=j_ok[None, :], other=0.0)
        s = tl.dot(qc, kc, s, input_precision=DOT_PREC)
    s = s * scale
    if HAS_KB:
        s += tl.load(KB + b * H * T + key, mask=j_ok, other=0.0)[None, :]
    s = tl.where(j_ok[None, :], s, float("-inf"))
    s3 = tl.reshape(s, (BLOCK_N, H, T_P))
    e = tl.exp(s3 - tl.max(s3, axis=2)[:, :, None])  # every head has T >= 1 real keys: a finite max
    p = tl.reshape(e / tl.sum(e, axis=2)[:, :, None], (BLOCK_N, H * T_P))
    c = tl.arange(0, C)
    vt = tl.load(V + b * H * T * C + key[:, None] * C + c[None, :], mask=j_ok[:, None], other=0.0)
    o = tl.dot(p, vt, input_precision=DOT_PREC)
    if HAS_OB:
        o += tl.load(OB + c)[None, :]
    o += tl.load(R + b * stride_rb + offs_n[:, None] * stride_rn + c[None, :] * stride_rc,
                 mask=n_ok[:, None], other=0.0).to(tl.float32)
    mean = tl.sum(o, axis=1) / C
    centred = o - mean[:, None]
    var = tl.sum(centred * centred, axis=1) / C
    y = centred / tl.sqrt(var + eps)[:, None] * tl.load(LNW + c)[None, :] + tl.load(LNB + c)[None, :]
    rows = b * N * C + offs_n[:, None] * C + c[None, :]
    tl.store(Y + rows, y, mask=n_ok[:, None])
    if HAS_POS:
        y += tl.load(POS + b * stride_pb + offs_n[:, None] * stride_pn + c[None, :] * stride_pc,
                     mask=n_ok[:, None], other=0.0).to(tl.float32)
        tl.store(YP + rows, y, mask=n_ok[:, None])


def few_key_attention_norm_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor,
                                  ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, softmax_scale: float,
                                  k_bias: Optional[torch.Tensor], out_bias: Optional[torch.Tensor],
                                  pos: Optional[torch.Tensor], t_padded: int,
                                  out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The kernel on checked inputs (few_keys.few_key_attention_norm checks them): k, v (B, H, T, C) and the
    vectors float32 contiguous; t_padded: T_P. out: two contiguous float32 (B, N, C) to write y and y_pos
    into (tests fill them with NaN first)."""
    B, H, T, C = k.shape
    N = q.shape[1]
    if out is None:
        out = tuple(torch.empty((B, N, C), dtype=torch.float32, device=q.device) for _ in range(2 if pos is not None else 1))
    y, y_pos = out[0], (out[1] if pos is not None else None)
    if B == 0 or N == 0:
        return y, y_pos

    def rows(t: torch.Tensor, start: int):
        """t from sample `start` on and its strides; a batch of 1 (every sample's) gets batch stride 0."""
        if t.shape[0] == 1:
            return t, (0, t.stride(1), t.stride(2))
        return t[start:], tuple(t.stride())

    for start in range(0, B, MAX_GRID_Y):  # samples run on the grid's second axis
        n = min(MAX_GRID_Y, B - start)
        (qs, sq), (rs, sr) = rows(q, start), rows(residual, start)
        ps, sp = rows(pos, start) if pos is not None else (q, (0, 0, 0))  # q stands in for no pos; never read
        _few_keys_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n)](
            qs, k[start:], k_bias[start:] if k_bias is not None else k, v[start:],
            out_bias if out_bias is not None else ln_bias, rs, ln_weight, ln_bias, ps, y[start:],
            y_pos[start:] if y_pos is not None else y, *sq, *sr, *sp, N, softmax_scale, eps,
            C=C, H=H, T=T, T_P=t_padded, HAS_KB=k_bias is not None, HAS_OB=out_bias is not None,
            HAS_POS=pos is not None, DOT_PREC=dot_precision(torch.float32),
        )
    return y, y_pos
