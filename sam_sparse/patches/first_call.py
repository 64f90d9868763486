"""A patched image encoder's first call of an input signature, and whether a call must run as Python.

compile_ahead_once runs the encoder's forward once inside kernels.compile_ahead before the real call, so that
the attention kernels of every block compile together on a thread pool instead of one block after another at their
first launch (a fresh process's first call of a patched hiera_b+ was about 8.5 s of such compiles, one after
another: docs/benchmarks.md, run 128). SAM's ImageEncoderViT (attention.SparseImageEncoderViT) and SAM 2's image
encoder (sam2_encoder.GraphedImageEncoder) call it from their forward; the switch (compile_ahead) and the signatures
done (compiled_ahead) are the handle's MemoryContext's (memory.py). Family-free.

must_run_eagerly(module): whether a call must run the module's Python as it is, which neither a graph replay
(sam2_encoder.py) nor a pass that its hooks would see may stand in for.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn.modules import module as nn_module

from ..kernels import compile_ahead


def must_run_eagerly(module: torch.nn.Module) -> bool:
    """Whether something must see or run this very call: a forward hook or pre-hook on any submodule (or a global
    one), an observed patched attention (handle.observe), a submodule in training mode (a graph captured in eval
    mode would replay eval), or a forward replaced on a submodule instance (offloading wrappers)."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or m.training or "forward" in m.__dict__:
            return True
        state = m.__dict__.get("_sam_sparse")
        if state is not None and state.observer is not None:
            return True
    return False


def _on_device(sample: torch.Tensor) -> bool:
    """Whether the pass can help: kernels compile for CUDA tensors only (a seam for the CPU tests)."""
    return sample.is_cuda


def compile_ahead_once(encoder: torch.nn.Module, ctx, sample: torch.Tensor, forward: Callable[[], object],
                       extra: tuple = ()) -> None:
    """On the first eager call of an input signature, forward() (the encoder's own forward on `sample`, outputs
    dropped) once inside kernels.compile_ahead; the caller's real forward follows and compiles nothing.

    The signature: sample's shape, dtype and device, the CUDA autocast dtype, the encoder's weight dtype, and
    `extra` (what else the kernels' shapes depend on, e.g. SAM 2's scalp). ctx: the handle's MemoryContext, whose
    compile_ahead switches this and whose compiled_ahead[signature] records whether a pass ran (False: compile_ahead
    declined, e.g. a Triton without async compiles). No pass under torch.compile's tracing, off CUDA, with grad on,
    with the switch off, during a CUDA graph capture, or where must_run_eagerly (a hook would see the pass): those
    calls leave the signature to a later one. A pass that fails is dropped: the real forward that follows reports what is wrong."""
    if torch.compiler.is_compiling():  # traced: the compiled code's first run compiles the kernels
        return
    if ctx is None or not ctx.compile_ahead or not _on_device(sample) or torch.is_grad_enabled():
        return
    weight = next(encoder.parameters(), None)
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    key = (tuple(sample.shape), sample.dtype, sample.device, autocast, None if weight is None else weight.dtype, extra)
    if key in ctx.compiled_ahead or (sample.is_cuda and torch.cuda.is_current_stream_capturing()) \
            or must_run_eagerly(encoder):
        return
    with compile_ahead(sample.device) as compiling:
        ctx.compiled_ahead[key] = compiling
        if compiling:
            try:
                forward()
            except Exception:
                pass
