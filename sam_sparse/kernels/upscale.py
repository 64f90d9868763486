"""A 4x upscaling head with per-sample projections, as one call: the functional API, its checks and dispatch.

    masks = upscale_project(x, (h, w), w1, b1, ln_weight, ln_bias, eps, w2, b2, hyper)

Two 2x2 stride-2 transposed convolutions (ConvTranspose2d weights), each optionally plus a skip map, the
first followed by a LayerNorm over channels and GELU, the second by GELU, then hyper[b] @ the upscaled
channels of sample b (a segmentation mask decoder's output head, with or without skip features). CUDA tensors run
the fused Triton kernel (triton_upscale.py), which never writes the upscaled maps; CPU tensors run torch's
own ops (reference.py), unless SAM_SPARSE_FORCE_TRITON=1 and TRITON_INTERPRET=1 are both set (CI tests the
kernel that way, as interface.py's attention).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .interface import describe_tensor, use_triton
from .reference import upscale_project_reference

CHANNELS_ACCEPTED = "powers of two from 16 to 128"
MAX_PROJECTIONS = 64  # M: the kernel holds a (C2, M) tile of projections in registers


def _check(x, grid, w1, b1, ln_weight, ln_bias, w2, b2, hyper, add1, add2) -> None:
    if x.dim() != 3:
        raise ValueError(f"x: {describe_tensor(x)}; expected (batch, h * w, channels)")
    B, hw, C = x.shape
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"x: dtype {x.dtype}; expected float32, float16, bfloat16 (or float64 on the CPU)")
    if len(grid) != 2 or grid[0] * grid[1] != hw:
        raise ValueError(f"grid={tuple(grid)}: expected (h, w) with h * w = {hw}, x's second dimension")
    if w1.dim() != 4 or w1.shape[0] != C or tuple(w1.shape[2:]) != (2, 2):
        raise ValueError(f"w1: shape {tuple(w1.shape)}; expected ({C}, C1, 2, 2), a ConvTranspose2d weight")
    C1 = w1.shape[1]
    if w2.dim() != 4 or w2.shape[0] != C1 or tuple(w2.shape[2:]) != (2, 2):
        raise ValueError(f"w2: shape {tuple(w2.shape)}; expected ({C1}, C2, 2, 2), a ConvTranspose2d weight")
    C2 = w2.shape[1]
    for name, t, n in (("b1", b1, C1), ("ln_weight", ln_weight, C1), ("ln_bias", ln_bias, C1), ("b2", b2, C2)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name}: shape {tuple(t.shape)}; expected ({n},)")
    if hyper.dim() != 3 or hyper.shape[0] != B or hyper.shape[2] != C2:
        raise ValueError(f"hyper: {describe_tensor(hyper)}; expected ({B}, M, {C2})")
    h, w = grid
    for name, t, shape in (("add1", add1, (C1, 2 * h, 2 * w)), ("add2", add2, (C2, 4 * h, 4 * w))):
        if t is not None and (t.dim() != 4 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != shape
                              or not t.is_floating_point()):
            raise ValueError(f"{name}: {describe_tensor(t)}; expected ({B} or 1, {', '.join(map(str, shape))})")
    for t in (w1, b1, ln_weight, ln_bias, w2, b2, hyper, add1, add2):
        if t is not None and t.device != x.device:
            raise ValueError(f"every tensor on x's device {x.device}; got {describe_tensor(t)}")


def upscale_project(x: torch.Tensor, grid: Tuple[int, int], w1: torch.Tensor, b1: torch.Tensor,
                    ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, w2: torch.Tensor,
                    b2: torch.Tensor, hyper: torch.Tensor, add1: Optional[torch.Tensor] = None,
                    add2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Upscale a token grid 4x and project it per sample. No gradient.

    x: (B, h*w, C), tokens in raster order on the h x w grid, any strides; float32, float16 or bfloat16
        (float64 on the CPU path), computed in float32 (float64 for float64).
    grid: (h, w).
    w1: (C, C1, 2, 2), b1: (C1,): the first ConvTranspose2d (stride 2); ln_weight, ln_bias (C1,) and eps:
        a LayerNorm over the C1 channels of each upscaled pixel, then GELU (erf).
    w2: (C1, C2, 2, 2), b2: (C2,): the second ConvTranspose2d (stride 2), then GELU.
    hyper: (B, M, C2): M projections per sample.
    add1: None or (B | 1, C1, 2h, 2w), added after the first convolution (before the LayerNorm); add2: None
        or (B | 1, C2, 4h, 4w), added after the second (before its GELU); a batch of 1 is every sample's.

    Returns float32 (B, M, 4h, 4w) (float64 for float64 x): out[b, m] = hyper[b, m] @ the C2 channels.
    The Triton path needs C a multiple of 16, C1 and C2 powers of two from 16 to 128 (a (C1, C2) weight tile
    sits in shared memory) and M <= 64. Under torch.autocast the torch path still computes in float32.
    """
    _check(x, grid, w1, b1, ln_weight, ln_bias, w2, b2, hyper, add1, add2)
    if not use_triton(x) or x.dtype == torch.float64:
        return upscale_project_reference(x, grid, w1, b1, ln_weight, ln_bias, eps, w2, b2, hyper, add1, add2)
    C, C1, C2 = x.shape[2], w1.shape[1], w2.shape[1]
    if C % 16 or any(n < 16 or n > 128 or n & (n - 1) for n in (C1, C2)):
        raise ValueError(f"channels C={C}, C1={C1}, C2={C2}: the kernel needs C a multiple of 16 and C1, C2 "
                         f"{CHANNELS_ACCEPTED}")
    if hyper.shape[1] > MAX_PROJECTIONS:
        raise ValueError(f"hyper: {hyper.shape[1]} projections per sample; the kernel takes at most {MAX_PROJECTIONS}")
    from .triton_upscale import pack_weights, upscale_project_triton

    w1p, w2p = pack_weights(w1, w2)
    vec = [t.float().contiguous() for t in (b1, ln_weight, ln_bias, b2)]
    return upscale_project_triton(x, tuple(grid), w1p, vec[0], vec[1], vec[2], float(eps), w2p, vec[3],
                                  hyper.float().contiguous(), add1, add2)
