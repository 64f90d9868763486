"""SAM 2's image encoder (trunk + neck) replayed from a CUDA graph at batch 1, under patch_sam.

At batch 1 a patched Hiera encoder's kernel launches take the host longer than the GPU takes to run them
(hiera_l: 48 attention calls of 30-80 us of host time each, docs/benchmarks.md runs 77-86), so the GPU
waits. patch_sam swaps the class of a SAM 2 image model's ImageEncoder for GraphedImageEncoder (the family's
containers(); restore() swaps it back) and gives it one plain attribute, ``_sam_sparse_memory``, the handle's
MemoryContext (its switches and the graph: a copy or pickle of the encoder alone carries the switches only,
not the model). Its forward replays a CUDA graph (cuda_graphs.GraphedFunction) of ImageEncoder.forward when:

- the MemoryContext's graph_encoder is on (patch_sam's graph_encoder; the default),
- the input is one image on CUDA, with grad off (inference_mode or no_grad), outside torch.compile's tracing
  and outside a CUDA graph capture of the caller's own,
- nothing must run as Python or as the module is now: no forward hook or pre-hook on any module of the encoder
  (global ones too), no patched attention observed (handle.observe: calibration, block-mass statistics), no
  module in training mode, no module whose forward is replaced on the instance (offloading wrappers).

Otherwise it runs ImageEncoder.forward. A shape is captured on its second call in a row (a one-off size
costs no capture); two graphs are kept. The graph is keyed by the encoder's parameter storage (moving or
recasting the model captures again) and its scalp, and freed by restore(). Outputs are the eager forward's,
bit for bit (the same kernels), as fresh tensors. Video predictors keep their own per-frame graph
(sam2_video.py).
"""

from __future__ import annotations

import functools
import threading

import torch
from sam2.modeling.backbones.image_encoder import ImageEncoder
from torch.nn.modules import module as nn_module

from ..cuda_graphs import GraphedFunction, module_storage

_LOCK = threading.Lock()  # two threads on a first call: one GraphedFunction


def _must_run_eagerly(encoder: torch.nn.Module) -> bool:
    """Whether a replay would skip or misrepresent Python that this call must run: a forward hook or pre-hook
    on any module of the encoder (or a global one), an observed patched attention, a module in training mode
    (a graph captured in eval mode would replay eval), or a forward replaced on a module instance."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    for m in encoder.modules():
        if m._forward_hooks or m._forward_pre_hooks or m.training or "forward" in m.__dict__:
            return True
        state = m.__dict__.get("_sam_sparse")
        if state is not None and state.observer is not None:
            return True
    return False


def _graph_state(encoder: ImageEncoder) -> tuple:
    """What the graph reads besides its input: the parameters' storage, and scalp (how many of the lowest
    resolution levels forward drops)."""
    return module_storage(encoder) + (encoder.scalp,)


class GraphedImageEncoder(ImageEncoder):
    """sam2's ImageEncoder whose batch-1 forward replays a CUDA graph (see the module's docstring).

    forward(sample): sample (1, 3, H, W) -> ImageEncoder's dict (vision_features, vision_pos_enc,
    backbone_fpn), the same values as ImageEncoder.forward.
    """

    _sam_sparse_memory = None  # the handle's MemoryContext, set by PatchHandle.enable

    def forward(self, sample: torch.Tensor):
        ctx = self._sam_sparse_memory
        # Grad on and a capture already under way (ours or the caller's): GraphedFunction runs the forward as is.
        if (torch.compiler.is_compiling() or ctx is None or not ctx.graph_encoder or not sample.is_cuda
                or sample.shape[0] != 1 or _must_run_eagerly(self)):
            return super().forward(sample)
        with _LOCK:
            if ctx.encoder_graph is None:
                ctx.encoder_graph = GraphedFunction(super().forward, capture_after=1, max_graphs=2,
                                                    state=functools.partial(_graph_state, self))
        return ctx.encoder_graph(sample)
