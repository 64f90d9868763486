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
(sam2_video.py). Before any of that, an eager call of a new input signature compiles its kernels ahead
(first_call.py).

Under torch.compile the same holds at batch 1: compiled as it is, each of the 48 attention calls of hiera_l
is an opaque op that the compiled code calls back into Python for (30-60 us of host time each on an H200's
host, runs 67-100), and the GPU waits again. So when torch.compile traces a batch-1 call with grad off on
CUDA and graph_encoder on, and not for torch.export (an exported program outlives the process, and the op's
id with it), the encoder becomes one opaque op, ``sam_sparse::sam2_image_encoder`` (one node in the caller's
graph: fullgraph=True holds; a symbolic input size is specialized, one graph per size). Its implementation
runs ImageEncoder.forward compiled by torch.compile with Inductor's default mode and static shapes (whatever
backend and mode the caller asked for) and replays that from a CUDA graph of its own, with the rules above,
checked again when it runs (a hook added after compiling: that call runs ImageEncoder.forward eagerly). The
op is tagged cudagraph_unsafe, so a caller compiled with CUDA graphs (mode="reduce-overhead") runs it rather
than replaying its kernels without those checks. It takes the CUDA autocast dtype seen when tracing and runs
under it (a compiled graph runs with autocast off: its casts are in the graph). It finds its encoder by id()
in a registry that patch_sam, deepcopy and unpickling fill (enroll); the caller's guards on the encoder
(dynamo's own) keep an id to its encoder, so guard filters that drop module guards are not supported, and
the encoder's weights are not inputs of the op (a weight changed in place inside the same compiled function
is not seen). Its fake implementation (the output shapes and dtypes for tracing) runs the eager forward on
zeros once per input shape, dtype, autocast dtype, scalp and weight dtype, on the device, outside the
tracer's fake tensors (forward hooks on the encoder's modules see that run once, at compile time); a call
whose outputs differ from those is an error, not wrong data. The op's graph holds its own batch-1
activation memory, beside the eager path's graph if both ran.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import List, Optional

import torch
from sam2.modeling.backbones.image_encoder import ImageEncoder
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ..cuda_graphs import GraphedFunction, module_storage
from .first_call import compile_ahead_once, must_run_eagerly

_LOCK = threading.Lock()  # two threads on a first call: one GraphedFunction
_ENCODERS: "weakref.WeakValueDictionary[int, GraphedImageEncoder]" = weakref.WeakValueDictionary()  # id -> encoder
# encoder -> {_shape_key: the outputs' (shape, dtype)s}, for the fake implementation
_SHAPES: "weakref.WeakKeyDictionary[GraphedImageEncoder, dict]" = weakref.WeakKeyDictionary()


def _graph_state(encoder: ImageEncoder) -> tuple:
    """What the graph reads besides its input: the parameters' storage, and scalp (how many of the lowest
    resolution levels forward drops)."""
    return module_storage(encoder) + (encoder.scalp,)


def _exporting() -> bool:
    """Whether torch.export is tracing, read from the flag torch.export sets. Not torch.compiler.is_exporting():
    dynamo up to torch 2.11 at least folds that call to True inside any compiled function, torch.compile's too, so
    the op was never recorded there (runs 109, 110; newer dynamo reads the flag, as here)."""
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


def _on_device(sample: torch.Tensor) -> bool:
    """Whether a compiled caller's batch-1 call may become the op: on CUDA (a seam for the CPU tests)."""
    return sample.is_cuda


def _flat(out: dict) -> List[torch.Tensor]:
    """ImageEncoder's dict as one list of contiguous tensors: the position encodings, then the feature levels
    (vision_features is the last level)."""
    return [t.contiguous() for t in (*out["vision_pos_enc"], *out["backbone_fpn"])]


def _nested(flat: List[torch.Tensor]) -> dict:
    """_flat's list back as ImageEncoder's dict."""
    pos, fpn = list(flat[:len(flat) // 2]), list(flat[len(flat) // 2:])
    return {"vision_features": fpn[-1], "vision_pos_enc": pos, "backbone_fpn": fpn}


def _flat_forward(encoder: ImageEncoder, sample: torch.Tensor) -> List[torch.Tensor]:
    return _flat(ImageEncoder.forward(encoder, sample))


class GraphedImageEncoder(ImageEncoder):
    """sam2's ImageEncoder whose batch-1 forward replays a CUDA graph (see the module's docstring).

    forward(sample): sample (1, 3, H, W) -> ImageEncoder's dict (vision_features, vision_pos_enc,
    backbone_fpn), the same values as ImageEncoder.forward.
    """

    _sam_sparse_memory = None  # the handle's MemoryContext, set by PatchHandle.enable

    @staticmethod
    def enroll(encoder: "GraphedImageEncoder") -> None:
        """Make the encoder findable by the op its compiled callers record (patch_sam and copies call it)."""
        _ENCODERS[id(encoder)] = encoder

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.__dict__.get("_sam_sparse_memory") is not None:  # a deep copy or an unpickled patched encoder
            self.enroll(self)

    def forward(self, sample: torch.Tensor):
        ctx = self._sam_sparse_memory
        if torch.compiler.is_compiling():
            # torch.export: traced as is (an exported program outlives this process, and the op's id with it).
            # Hooks, observers and training mode are checked when the op runs.
            if (ctx is not None and ctx.graph_encoder and not _exporting() and _on_device(sample)
                    and sample.shape[0] == 1 and not torch.is_grad_enabled()):
                autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
                return _nested(_compiled_encoder(sample, id(self), autocast))
            return super().forward(sample)
        eager = super().forward
        compile_ahead_once(self, ctx, sample, lambda: eager(sample), extra=(self.scalp,))
        if not self._replays(ctx, sample):
            return eager(sample)
        return self._graph(ctx, "encoder_graph", lambda: eager)(sample)

    def compiled_forward(self, sample: torch.Tensor) -> List[torch.Tensor]:
        """_flat(forward(sample)) as the op runs it inside a compiled caller: the encoder compiled and replayed
        from a CUDA graph at batch 1 (ctx.compiled_encoder_graph), or ImageEncoder.forward eagerly where the
        rules of the module's docstring say so."""
        ctx = self._sam_sparse_memory
        if not self._replays(ctx, sample):
            return _flat_forward(self, sample)
        compile_ = lambda: torch.compile(functools.partial(_flat_forward, self), dynamic=False)  # noqa: E731
        return self._graph(ctx, "compiled_encoder_graph", compile_)(sample)

    def _replays(self, ctx, sample: torch.Tensor) -> bool:
        """Whether a call may replay a graph, by the rules of the module's docstring that hold when it runs. Grad
        on and a capture already under way (ours or the caller's) are GraphedFunction's to check: it runs the
        function as is then."""
        return (ctx is not None and ctx.graph_encoder and sample.is_cuda and sample.shape[0] == 1
                and not must_run_eagerly(self))

    def _graph(self, ctx, name: str, make) -> GraphedFunction:
        """ctx's GraphedFunction `name` of make()'s function, made on first use (two threads on a first call:
        one)."""
        with _LOCK:
            if getattr(ctx, name) is None:
                setattr(ctx, name, GraphedFunction(make(), capture_after=1, max_graphs=2,
                                                   state=functools.partial(_graph_state, self)))
            return getattr(ctx, name)


# cudagraph_unsafe: a caller compiled with CUDA graphs (mode="reduce-overhead") must run the op, not replay its
# kernels: the op checks hooks, observers and its own graph when it runs, which dynamo never traced.
@torch.library.custom_op("sam_sparse::sam2_image_encoder", mutates_args=(),
                         tags=(torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ())
def _compiled_encoder(sample: torch.Tensor, encoder_id: int, autocast: Optional[torch.dtype]) -> List[torch.Tensor]:
    """The patched encoder enrolled as `encoder_id` on sample (1, 3, H, W), under CUDA autocast to `autocast`
    (None: off), as the caller was traced: its outputs as _flat lists them."""
    encoder = _enrolled(encoder_id)
    # A compiled caller runs its graph with autocast off (the graph holds its casts): the traced state is restored.
    with _autocast(autocast):
        out = encoder.compiled_forward(sample)
    # The caller's code was made for the fake implementation's shapes and dtypes: a difference must not reach it.
    expected = _SHAPES.get(encoder, {}).get(_shape_key(encoder, sample, autocast))
    if expected is not None and expected != [(t.shape, t.dtype) for t in out]:
        raise RuntimeError(f"sam_sparse::sam2_image_encoder: the encoder gave {[(tuple(t.shape), t.dtype) for t in out]} "
                           f"where its compiled caller was traced for {[(tuple(s), d) for s, d in expected]}")
    return out


def _autocast(dtype: Optional[torch.dtype]):
    return torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None, cache_enabled=False)


def _shape_key(encoder: ImageEncoder, sample: torch.Tensor, autocast: Optional[torch.dtype]) -> tuple:
    """What the outputs' shapes and dtypes depend on: the input's (static) shape and dtype, autocast, the
    encoder's scalp and weight dtype."""
    weight = next(encoder.parameters(), None)
    return (tuple(int(n) for n in sample.shape), sample.dtype, autocast, encoder.scalp,
            None if weight is None else weight.dtype)


def _enrolled(encoder_id: int) -> GraphedImageEncoder:
    encoder = _ENCODERS.get(encoder_id)
    if type(encoder) is not GraphedImageEncoder or encoder.__dict__.get("_sam_sparse_memory") is None:
        raise RuntimeError(f"sam_sparse::sam2_image_encoder: no patched image encoder has id {encoder_id}; the op is "
                           "recorded by a patched encoder's forward under torch.compile, not called directly")
    return encoder


@_compiled_encoder.register_fake
def _(sample: torch.Tensor, encoder_id: int, autocast: Optional[torch.dtype]) -> List[torch.Tensor]:
    encoder = _enrolled(encoder_id)
    shapes = _SHAPES.setdefault(encoder, {})
    key = _shape_key(encoder, sample, autocast)  # int(): a symbolic size is specialized (one graph per size)
    if key not in shapes:
        # The eager forward on zeros, outside the tracer's fake tensors: a fake run would leave fake tensors in
        # the modules' caches (sam2's position encodings keep one per size).
        with unset_fake_temporarily(), torch.no_grad(), _autocast(autocast):
            zeros = torch.zeros(key[0], dtype=sample.dtype, device=sample.device)
            shapes[key] = [(t.shape, t.dtype) for t in _flat_forward(encoder, zeros)]
    return [sample.new_empty(shape, dtype=dtype) for shape, dtype in shapes[key]]
