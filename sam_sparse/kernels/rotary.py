"""Rotary position encoding in place: the functional API, its checks and dispatch.

    rotary_embedding_(x, cos, sin)                 # token n of x uses table row n % T
    rotary_embedding_(x, cos, sin, positions)      # token n uses row positions[n]; -1 leaves it as it is

x (B, H, N, D) is rotated pair by pair: (x[..., 2i] + i x[..., 2i+1]) * (cos[p, i] + i sin[p, i]), in float32,
stored back in x's dtype: RoPE with a precomputed table (SAM 2's axial tables are (frame tokens, D/2)
complex; pass their .real and .imag). In place, so a view rotates the part of a tensor it covers (the
keys of a memory before its pointer tokens). CUDA tensors run the Triton kernel (triton_rotary.py), one
read and one write of x; CPU tensors run torch's complex multiplication (reference.py), unless
SAM_SPARSE_FORCE_TRITON=1 and TRITON_INTERPRET=1 are both set. The two agree to float32 rounding (the
compilers may contract a product and a difference into an FMA differently). Under torch.compile it is the
custom op sam_sparse::rotary_embedding_ (mutating x), which the compiler does not trace into.
"""

from __future__ import annotations

from typing import Optional

import torch

from .interface import describe_tensor, use_triton
from .reference import rotary_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, cos, sin, positions) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"x: {describe_tensor(x) if isinstance(x, torch.Tensor) else type(x).__name__}; "
                         "expected (B, H, N, D) with D even")
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"x: dtype {x.dtype}; expected float32, float16, bfloat16 (or float64 on the CPU)")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"x: {describe_tensor(x)}; expected its last dim contiguous (it is rotated in place)")
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != x.shape[-1] // 2 or t.shape[0] < 1:
            raise ValueError(f"{name}: {describe_tensor(t) if isinstance(t, torch.Tensor) else type(t).__name__}; "
                             f"expected (T >= 1, {x.shape[-1] // 2}), half of x's head dim")
        if t.dtype not in (torch.float32, torch.float64) or t.device != x.device:
            raise ValueError(f"{name}: {describe_tensor(t)}; expected float32 on {x.device}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)}: expected the same shape")
    if positions is not None:
        if (not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.shape[0] != x.shape[-2]
                or positions.dtype not in (torch.int32, torch.int64) or positions.device != x.device):
            raise ValueError(f"positions: {describe_tensor(positions) if isinstance(positions, torch.Tensor) else positions!r}; "
                             f"expected None or an int32 / int64 tensor ({x.shape[-2]},) on {x.device}")


def rotary_embedding_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rotate x (B, H, N, D) in place by the table (cos, sin) (T, D/2) float32; returns x.

    positions: None (token n uses row n % T: one table repeated over several frames of tokens), or (N,)
    int32 / int64 rows, where -1 leaves a token unchanged. Rows must be < T (not checked on CUDA: that
    would wait for the device).
    """
    _check(x, cos, sin, positions)
    if torch.compiler.is_compiling():
        _rotary_op(x, cos, sin, positions)  # opaque to torch.compile (SAM2VideoPredictorVOS's memory attention)
    else:
        _rotary_impl(x, cos, sin, positions)
    return x


def _rotary_impl(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor]) -> None:
    if use_triton(x) and x.dtype != torch.float64:
        from .triton_rotary import rotary_triton

        pos = positions.to(torch.int32) if positions is not None else None
        rotary_triton(x, cos.float().contiguous(), sin.float().contiguous(), pos)
    else:
        rotary_reference(x, cos, sin, positions)


_rotary_op = torch.library.custom_op("sam_sparse::rotary_embedding_", _rotary_impl, mutates_args=("x",))


@_rotary_op.register_fake
def _(x, cos, sin, positions):
    return None
