"""What the Triton kernels share: the interpreter flag and its NumPy fix, the launch-grid limit, tile
rounding and the tl.dot precision of float32 operands (in a matmul, in a convolution)."""

from __future__ import annotations

import os

import torch

# The interpreter is chosen when kernels are defined (import time), so read the flag once here.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_GRID_Y = 65535  # CUDA's limit on a launch grid's second and third axes


def patch_interpreter_for_numpy() -> None:
    """Make Triton's interpreter before 3.8 work with NumPy >= 2.4 (done on import when TRITON_INTERPRET=1).

    The interpreter holds a scalar as a 1-element array and turns it into a Python int with int(array),
    which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"), so every loop
    bounded by a run-time value (``range(n_steps)``) fails: the GPU machines' torch 2.11 / Triton 3.6 with
    NumPy 2.5 did. It sets tensor.__index__ per launch in _patch_lang_tensor; this wraps that function to
    squeeze first, as Triton 3.8 does; once per process (a second call finds the wrapper), and nothing where
    Triton has no such function.
    """
    from triton.runtime import interpreter

    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    patch_interpreter_for_numpy()


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: "ieee" in the interpreter; for float32, what
    torch.get_float32_matmul_precision() asks of torch's own matmuls ("highest": 3xTF32, float32-level
    error; "high" / "medium": TF32); for 16-bit operands "tf32" (only fp32 side products see it)."""
    if INTERPRET:
        return "ieee"
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def conv_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for a convolution's float32 operands, as torch's own convolutions get it:
    TF32 where torch.backends.cudnn.allow_tf32 (True by default), else 3xTF32 (float32-level error; the
    matmul precision setting does not apply to convolutions). 16-bit operands and the interpreter: as
    dot_precision."""
    if INTERPRET or dtype != torch.float32:
        return dot_precision(dtype)
    return "tf32" if torch.backends.cudnn.allow_tf32 else "tf32x3"
