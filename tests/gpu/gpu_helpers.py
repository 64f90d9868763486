"""What the GPU test files share: their marks, the dtypes and error floors they check against the
float64 oracle (on top of 2x PyTorch's own error in the inputs' dtype), seeded CUDA inputs, the per-row check of a
sequence's output, and torch's float32 precision settings for one block."""

import contextlib
from typing import Optional

import pytest
import torch

GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with TRITON_INTERPRET=0 there)"),
]

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ROW_FLOOR = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 6e-2}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def seeded():
    """(seed, CUDA generator): fresh inputs every run; the seed goes in failure messages."""
    seed = torch.seed() % 2**31
    return seed, torch.Generator(device="cuda").manual_seed(seed)


def rnd(g, *shape, dtype):
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


def check_rows(out, q, k, v, mask, bs, seed):
    """Assert out (B, N, H, D), finite, against the float64 oracle globally and per row, relative to PyTorch's own
    computation in q's dtype (2x its error plus FLOOR / ROW_FLOOR); mask: a block mask at block size bs, or None."""
    from oracle import oracle_attention, rel_error, same_dtype_torch

    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), f"seed {seed}: NaN or a row left unwritten"
    ref = oracle_attention(q, k, v, mask, block_size=bs)
    base = same_dtype_torch(q, k, v, mask, block_size=bs)
    err, err_base = rel_error(out, ref), rel_error(base, ref)
    assert err <= 2 * err_base + FLOOR[q.dtype], f"seed {seed}: error {err:.3g} vs PyTorch {q.dtype} {err_base:.3g}"
    row_err = (out.double() - ref).abs().amax(-1)
    row_base = (base.double() - ref).abs().amax(-1)
    bad = row_err > 2 * row_base + ROW_FLOOR[q.dtype]
    assert not bad.any(), f"seed {seed}: {int(bad.sum())} rows off, worst {row_err.max():.3g}"


@contextlib.contextmanager
def float32_settings(matmul: str = "highest", conv_tf32: Optional[bool] = None):
    """torch's float32 precision for matmuls (set_float32_matmul_precision) and, unless None, for cuDNN's
    convolutions (cudnn.allow_tf32; the upscaling kernel's convolution products follow it, its projections
    the former), restored after."""
    previous = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision(matmul)
    if conv_tf32 is not None:
        torch.backends.cudnn.allow_tf32 = conv_tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        torch.backends.cudnn.allow_tf32 = previous[1]
