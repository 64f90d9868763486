"""Attention of many queries to a few keys per sample, then a residual add and a LayerNorm, as one call:
the functional API, its checks and dispatch.

    y, y_pos = few_key_attention_norm(q, k, v, residual, ln_weight, ln_bias, eps, softmax_scale=s,
                                      k_bias=kb, out_bias=ob, pos=pos)

H heads of T keys per sample (T small: a handful of prompt tokens), with k and v given in the queries' and
the outputs' channel space (a model's key, query, value and output projections folded into them), so every
query row of C channels attends with one product and the row's LayerNorm follows in registers. CUDA
tensors run the fused Triton kernel (triton_few_keys.py), which writes only y and y_pos; CPU tensors run
torch's own ops (reference.py), unless SAM_SPARSE_FORCE_TRITON=1 and TRITON_INTERPRET=1 are both set (CI
tests the kernel that way, as interface.py's attention).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .interface import describe_tensor, use_triton
from .reference import few_key_attention_norm_reference

CHANNELS_ACCEPTED = "a power of two from 16 to 256"
HEADS_ACCEPTED = "a power of two, with heads x keys per head (rounded up to a power of two) at most 128"
MAX_HEAD_KEYS = 128  # H * T_P: the (BLOCK_N, H * T_P) score tile and the (H * T_P, C) value tile


def padded_keys(H: int, T: int) -> int:
    """T_P: keys per head rounded up to a power of two, and so that H * T_P >= 16 (tl.dot's least K)."""
    t = 1 << max(0, (T - 1).bit_length())
    return max(t, 16 // min(H, 16))


def _check(q, k, v, residual, ln_weight, ln_bias, k_bias, out_bias, pos) -> None:
    if k.dim() != 4:
        raise ValueError(f"k: {describe_tensor(k)}; expected (batch, heads, keys per head, channels)")
    B, H, T, C = k.shape
    if q.dim() != 3 or q.shape[0] not in (1, B) or q.shape[2] != C:
        raise ValueError(f"q: {describe_tensor(q)}; expected (1 or {B}, N, {C})")
    N = q.shape[1]
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"q: dtype {q.dtype}; expected float32, float16, bfloat16 (or float64 on the CPU)")
    if tuple(v.shape) != (B, H, T, C):
        raise ValueError(f"v: {describe_tensor(v)}; expected k's shape {(B, H, T, C)}")
    if residual.dim() != 3 or residual.shape[0] not in (1, B) or tuple(residual.shape[1:]) != (N, C):
        raise ValueError(f"residual: {describe_tensor(residual)}; expected (1 or {B}, {N}, {C})")
    for name, t, shape in (("ln_weight", ln_weight, (C,)), ("ln_bias", ln_bias, (C,)), ("k_bias", k_bias, (B, H, T)),
                           ("out_bias", out_bias, (C,))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)}; expected {shape}")
    if pos is not None and (pos.dim() != 3 or pos.shape[0] not in (1, B) or tuple(pos.shape[1:]) != (N, C)):
        raise ValueError(f"pos: {describe_tensor(pos)}; expected (1 or {B}, {N}, {C})")
    for t in (k, v, residual, ln_weight, ln_bias, k_bias, out_bias, pos):
        if t is not None and t.device != q.device:
            raise ValueError(f"every tensor on q's device {q.device}; got {describe_tensor(t)}")
        if t is not None and not t.is_floating_point():
            raise ValueError(f"every tensor floating point; got {describe_tensor(t)}")


def few_key_attention_norm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor,
                           ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, softmax_scale: float = 1.0,
                           k_bias: Optional[torch.Tensor] = None, out_bias: Optional[torch.Tensor] = None,
                           pos: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """LayerNorm(residual + attention of each query row to its sample's keys), and that plus pos. No gradient.

    q: (1 | B, N, C) query rows, any strides; a batch of 1 is every sample's. float32, float16 or bfloat16
        (float64 on the CPU path); every input is computed in float32 (float64 for float64 q).
    k: (B, H, T, C): T keys in each of H heads, in q's channel space: head h's score for key t is
        softmax_scale * (q . k[b, h, t]) + k_bias[b, h, t]; softmax over the T keys of each head.
    v: (B, H, T, C): the values in the output's channel space; the output is the sum over heads of each
        head's softmax-weighted values, plus out_bias (C,).
    residual: (1 | B, N, C), added before the LayerNorm (ln_weight, ln_bias (C,), eps) over the C channels.
    pos: None or (1 | B, N, C), added to y for the second output.

    Returns y (B, N, C) and y + pos (None without pos), float32 (float64 for float64 q), contiguous. The
    Triton path needs C a power of two from 16 to 256 and H a power of two with H * T (T rounded up to a
    power of two) at most 128. Under torch.autocast the torch path still computes in float32.
    """
    _check(q, k, v, residual, ln_weight, ln_bias, k_bias, out_bias, pos)
    if not use_triton(q) or q.dtype == torch.float64:
        return few_key_attention_norm_reference(q, k, v, residual, ln_weight, ln_bias, eps, softmax_scale,
                                                k_bias, out_bias, pos)
    B, H, T, C = k.shape
    if C < 16 or C > 256 or C & (C - 1):
        raise ValueError(f"channels C={C}: the kernel needs {CHANNELS_ACCEPTED}")
    t_padded = padded_keys(H, T)
    if H & (H - 1) or H * t_padded > MAX_HEAD_KEYS:
        raise ValueError(f"{H} heads of {T} keys: the kernel needs {HEADS_ACCEPTED}")
    from .triton_few_keys import few_key_attention_norm_triton

    f32 = lambda t: None if t is None else t.float().contiguous()  # noqa: E731  (small: the keys and vectors)
    return few_key_attention_norm_triton(q, f32(k), f32(v), residual, f32(ln_weight), f32(ln_bias), float(eps),
                                         float(softmax_scale), f32(k_bias), f32(out_bias), pos, t_padded)
