"""patch_sam / unpatch_sam: route every attention module of a SAM model through block_sparse_attn.

    handle = patch_sam(sam, "dense")          # or a policy name, a policy file, a Policy object
    print(handle)                             # one row per patched module
    handle.restore()                          # or unpatch_sam(sam): the original model, exactly

Families: patch_sam recognises the model family from the object it is given (families.family_for):
segment-anything's Sam and its parts (sam1.py), or SAM 2's SAM2Base, its image predictor, automatic mask
generator, video predictor or image encoder (sam2.py). A family module says which of its modules are
attention layers of which kind, which sparse classes replace them and where the prompt hooks go; this
module does the same for every family.

How: each attention module's class is swapped for a subclass with a sparse forward (the family's
SPARSE_CLASSES) and one plain attribute ``_sam_sparse`` is attached; some modules around them get a subclass
too (the family's containers()): the encoder blocks around windowed attention modules, whose forward reads the
windows in place instead of partitioning the token grid; SAM's ImageEncoderViT (its first call of an input
signature compiles its kernels ahead: first_call.py) and a SAM 2 image model's ImageEncoder (the same, and
replayed from a CUDA graph at batch 1: sam2_encoder.py), whose one plain attribute, ``_sam_sparse_memory``, is
the handle's MemoryContext; and for SAM 2 video the memory attention (packed memories) and the model itself (the memory
calls' structure recorded; with batch_objects, every object of a frame propagated as one batch: sam2_video.py).
No parameter, buffer or module is added, removed or copied, so ``state_dict()`` keys and values are those of
the original model and a checkpoint loads into patched and unpatched models alike. A full model also gets
three forward hooks, methods of one PromptContext per model: the prompt encoder's pre-hook records the
current points/boxes (in token-grid units, per thread)
for prompt-dependent policies, the TwoWayTransformer's pre-hook records the image-embedding grid, and the
mask decoder's hook forgets the prompts after each call. restore() undoes all of it. A patched model can
be deep-copied (the copy gets its own context) and pickled whole (torch.save(model)).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..geometry import LayerGeometry
from ..kernels import HEAD_DIMS, HEAD_DIMS_ACCEPTED
from ..policy import load_policy
from ..table import format_table
from .attention import LayerState, PromptContext
from .families import family, family_for, unwrap
from .memory import MemoryContext, memory_block_layout


@dataclass(frozen=True)
class LayerReport:
    """One patched module.

    name: qualified name in the patched model. kind: LayerGeometry kind. pattern: "dense",
    "block-sparse" or "per-prompt" (the mask depends on the call's prompts). density: fraction of
    (query block, key block, head) pairs computed, 1.0 for dense, None when per-prompt. heads: attention
    heads. grid: query-side -> key-side token layout ("64x64", "14x14 window", "7 tokens").
    key_tile: (th, tw) when image tokens run in tiled order, else None.
    """

    name: str
    kind: str
    pattern: str
    density: Optional[float]
    heads: int
    grid: str
    block_size: int
    key_tile: Optional[Tuple[int, int]] = None


def _load(policy):
    if isinstance(policy, (str, os.PathLike)):
        return load_policy(policy)
    if hasattr(policy, "block_mask") and hasattr(policy, "block_size"):
        return policy
    return load_policy(policy)  # a Policy-like object of another kind: let the loader judge


def _with_tiles(geom: LayerGeometry, policy) -> LayerGeometry:
    """An encoder layer's geometry in the policy's tiled order (global blocks of a "tiles" policy)."""
    tile = policy.key_tile(geom) if geom.kind == "encoder.global" else None
    if tile is None:
        return geom
    th, tw = (int(t) for t in tile)
    grid = geom.k_grid
    if grid[0] % th or grid[1] % tw:
        raise ValueError(f"{geom.name}: policy {policy.name!r} tiles of {tile} do not divide the token grid {grid}")
    return replace(geom, key_tile=(th, tw))


def _fixed(kind: str) -> bool:
    """Layers whose geometry is known at patch time (image tokens on both sides, one grid)."""
    return kind.startswith("encoder.") or kind == "memory.self"


def _head_dim(module: nn.Module, kind: str) -> int:
    if kind.startswith("encoder."):
        return module.qkv.out_features // 3 // module.num_heads
    return module.internal_dim // module.num_heads


def _grid_text(g: LayerGeometry) -> str:
    side = lambda grid, n: f"{grid[0]}x{grid[1]}" if grid is not None else f"{n} tokens"  # noqa: E731
    if g.kind == "encoder.window":
        return f"{g.q_grid[0]}x{g.q_grid[1]} window"
    if g.kind in ("encoder.global", "memory.self"):
        return side(g.q_grid, g.seqlen_q)
    if g.kind == "encoder.pooled":
        return f"{side(g.q_grid, g.seqlen_q)} pooled -> {side(g.k_grid, g.seqlen_k)}"
    if g.kind == "memory.cross" and g.memory is not None:
        m = g.memory
        return (f"{side(g.q_grid, g.seqlen_q)} -> {len(m.frames)} frames ({m.cond_frames} cond) x "
                f"{m.grid[0]}x{m.grid[1]} + {m.pointer_tokens} pointers (nominal)")
    return f"{side(g.q_grid, g.seqlen_q)} -> {side(g.k_grid, g.seqlen_k)}"


_EPOCH = [0]  # bumped by every enable() and restore(): a CUDA graph of a model is valid within one epoch


def patch_epoch() -> int:
    """A number that changes whenever any model is patched or restored in this process: what a CUDA graph
    captured from a model's forward (cuda_graphs.GraphedFunction's state) must not outlive."""
    return _EPOCH[0]


def observing(model) -> bool:
    """Whether a handle is observing the model's patched modules (PatchHandle.observe): their Python must
    run, so graphs of the model must not replay."""
    handle = getattr(model, "_sam_sparse_handle", None)
    return handle is not None and handle.observing


def record_prompts(model, points, boxes) -> None:
    """Tell the decoder attentions of `model` (patched by patch_sam, enabled) this call's prompts, as the
    prompt encoder's hook does: for code that embeds prompts without calling model.prompt_encoder (a
    prompt-dependent policy would otherwise see none, or an earlier call's). points: (coords (B, N, 2),
    labels (B, N)) in the model's input frame, or None; boxes: (B, 4) or None. No-op for other models."""
    handle = getattr(model, "_sam_sparse_handle", None)
    if handle is not None and handle.active and handle.context is not None:
        prompt_encoder = family(handle.family).hook_targets(model)[0]
        if prompt_encoder is not None:
            handle.context.record(prompt_encoder, points, boxes)


def dense_attention(model, part: Optional[nn.Module] = None) -> bool:
    """Whether every attention module inside `part` (default: the whole model) computes what the unpatched
    model computes, up to float rounding: none is patched, or the handle patching `model` (or `part`
    itself) has a dense layout for each, and no handle observes them (their calls must run). Code that
    replaces a part's forward by the same math in another form (maskgen's factored decoder) asks this first."""
    part = model if part is None else part
    patched = [m for m in part.modules() if hasattr(m, "_sam_sparse")]
    if not patched:
        return True
    handles = {id(h): h for h in (getattr(model, "_sam_sparse_handle", None), getattr(part, "_sam_sparse_handle", None))
               if h is not None}.values()
    if any(h.observing for h in handles):
        return False
    rows = {id(m): rep for h in handles for rep, m in h.modules()}
    return all(id(m) in rows and rows[id(m)].pattern == "dense" for m in patched)


class PatchHandle:
    """A patched model. ``report``: one LayerReport per patched module; ``notes``: parts left alone.

    restore() puts back the original classes and removes the hooks (idempotent); unpatch_sam(model)
    does the same from the model. enable() patches again; ``with handle.disabled():`` runs the model
    unpatched inside the block and patched again after (PEFT's disable_adapter), for comparisons.
    """

    def __init__(self, model: nn.Module, policy, entries, report: List[LayerReport], notes: List[str], context,
                 family_name: str = "sam", memory: Optional[MemoryContext] = None):
        self.model = model
        self.family = family_name  # a name, not the module: the handle pickles with the model
        self.policy = policy
        self.report = report
        self.notes = notes
        self.context = context
        self.memory = memory if memory is not None else MemoryContext()  # video memory calls; batch_objects
        self._entries = entries  # (module, original class, LayerState)
        self._blocks: list = []  # (module, original class) of the containers swapped by enable()
        self._hooks: list = []
        self.active = False
        self.observing = False  # inside observe(): graphs of the model run eagerly

    def __getstate__(self):
        # A copy (deepcopy, pickle, torch.save) made inside observe() is not being observed.
        return {**self.__dict__, "observing": False}

    def modules(self) -> List[Tuple[LayerReport, nn.Module]]:
        """(report row, attention module) of every patched module, in forward order."""
        return [(rep, module) for rep, (module, _, _) in zip(self.report, self._entries)]

    def enable(self) -> None:
        """Patch the modules (again): the state patch_sam left them in. A no-op when active."""
        if self.active:
            return
        owner = getattr(self.model, "_sam_sparse_handle", None)
        if owner is not None:
            raise RuntimeError(f"{type(self.model).__name__} is patched by another handle ({owner!r}); restore that one first")
        fam = family(self.family)
        for module, _, state in self._entries:
            module.__class__ = fam.SPARSE_CLASSES[type(module)]
            module._sam_sparse = state
        # Modules around patched attention (windowed blocks, SAM 2's memory attention and video model).
        patched = {id(m) for m, _, _ in self._entries}
        swaps = fam.containers(self.model, patched)
        self._blocks = [(module, type(module)) for module, _ in swaps]
        for module, cls in swaps:
            module.__class__ = cls
            if hasattr(cls, "_sam_sparse_memory"):  # a container that reads the handle's switches (graph_encoder)
                module._sam_sparse_memory = self.memory
            if hasattr(cls, "enroll"):  # a container that a compiled caller's op finds by id (sam2_encoder.py)
                cls.enroll(module)
        model, ctx = self.model, self.context
        # Bound methods of the context, not closures: deepcopy and pickle carry them to the copy's context.
        prompt_encoder, mask_decoder, transformer = fam.hook_targets(model)
        if prompt_encoder is not None:
            self._hooks.append(prompt_encoder.register_forward_pre_hook(ctx.on_prompts, with_kwargs=True))
            self._hooks.append(mask_decoder.register_forward_hook(ctx.forget))
        if transformer is not None:
            self._hooks.append(transformer.register_forward_pre_hook(ctx.on_image, with_kwargs=True))
        model._sam_sparse_handle = self
        self.active = True
        _EPOCH[0] += 1

    @contextlib.contextmanager
    def observe(self, fn: Callable[..., None]):
        """Inside the block, every patched module calls ``fn(layer, prompts, q, k, rel_h, rel_w, key_tile,
        softmax_scale)`` with exactly what it gives the kernel: layer the call's LayerGeometry, prompts
        the call's Prompts (decoder layers of a Sam) or None, q (B, Nq, H, d), k (B, Nk, H, d), rel_h /
        rel_w (B, H, Nq, kh / kw) or None, key_tile (th, tw) or None. For measuring attention
        (calibration); fn must not change its arguments."""
        states = [state for _, _, state in self._entries]
        for state in states:
            state.observer = fn
        self.observing = True
        try:
            yield self
        finally:
            self.observing = False
            for state in states:
                state.observer = None

    @contextlib.contextmanager
    def disabled(self):
        """Run the model unpatched inside the block; the patch comes back after it (if it was active, and
        restore() was not called inside the block: that one is for good)."""
        was_active = self.active
        self._unpatch()
        restores = self.__dict__.get("_restores", 0)
        try:
            yield self
        finally:
            if was_active and self.__dict__.get("_restores", 0) == restores:
                self.enable()

    def restore(self) -> None:
        """Undo the patch exactly: original classes, no attribute or hook left. A no-op when restored."""
        self._restores = self.__dict__.get("_restores", 0) + 1  # a handle pickled before this field counts from 0
        self._unpatch()

    def _unpatch(self) -> None:
        if not self.active:
            return
        for module, cls, _ in self._entries:
            module.__class__ = cls
            del module._sam_sparse
        for block, cls in self._blocks:
            block.__class__ = cls
            block.__dict__.pop("_sam_sparse_memory", None)
        self._blocks = []
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.context.forget()
        self.memory.drop_graphs()
        del self.model._sam_sparse_handle
        self.active = False
        _EPOCH[0] += 1

    def __repr__(self) -> str:
        return f"<PatchHandle policy={getattr(self.policy, 'name', '?')!r} modules={len(self._entries)} active={self.active}>"

    def __str__(self) -> str:
        name = getattr(self.policy, "name", type(self.policy).__name__)
        state = "" if self.active else " (restored)"
        # The token order matters only where some layer runs tiled (never on MobileSAM's decoder-only patch).
        tiled = any(r.key_tile for r in self.report)
        order = f", order {getattr(self.policy, 'token_order', 'raster')}" if tiled else ""
        lines = [f"sam-sparse: {len(self.report)} attention modules patched with policy {name!r}, "
                 f"block {self.policy.block_size}{order}{state}"]
        lines += [f"note: {n}" for n in self.notes]
        rows = [("name", "kind", "pattern", "density", "heads", "grid")]
        for r in self.report:
            dens = "-" if r.density is None else f"{r.density:.3f}"
            pat = r.pattern + (f" tiles {r.key_tile[0]}x{r.key_tile[1]}" if r.key_tile else "")
            rows.append((r.name, r.kind, pat, dens, str(r.heads), r.grid))
        lines.append(format_table(rows[0], rows[1:]))
        return "\n".join(lines)


def _find_patched(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "_sam_sparse") or hasattr(m, "_sam_sparse_handle")]


def patch_sam(model, policy="dense", *, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
              batch_objects: Optional[bool] = None, graph_encoder: Optional[bool] = None,
              graph_heads: Optional[bool] = None) -> PatchHandle:
    """Route the attention modules of `model` through sam_sparse's block-sparse kernel, in place.

    model: a segment_anything Sam, ImageEncoderViT, MaskDecoder or TwoWayTransformer (a Sam whose image
        encoder is not an ImageEncoderViT, MobileSAM's TinyViT, gets only its mask decoder patched;
        handle.notes says so); or a sam2 SAM2Base (SAM2VideoPredictor included), SAM2ImagePredictor or
        SAM2AutomaticMaskGenerator (their model is patched: handle.model), ImageEncoder or Hiera.
    policy: a built-in policy name ("dense", ...), a policy file path, or a Policy object.
    filter_fn: (name, module) -> bool, called for each attention module with its qualified name in
        the patched model; modules for which it returns False stay as they are (torchao's quantize_ style).
    batch_objects: for a SAM2VideoPredictor, propagate_in_video runs every object of a frame as one batch
        (memory attention, mask decoder, memory encoder; memories of different lengths through the kernel's
        varlen path), each object's outputs as SAM 2's per-object loop gives them. False keeps SAM 2's
        per-object loop (with the patched modules). None (the default): True, except on a
        SAM2VideoPredictorVOS (vos_optimized=True), whose decoder and encoders SAM 2 compiles for one object
        at a time (a new object count compiles them again, and the ninth compile is an error); True there
        batches anyway. handle.memory.batch_objects switches it later. Given for any other model: ValueError.
    graph_encoder: for a SAM 2 model on CUDA, the image encoder replays a CUDA graph: a SAM2VideoPredictor's
        each frame (captured on the first frame), an image model's (SAM2Base, SAM2ImagePredictor,
        SAM2AutomaticMaskGenerator, ImageEncoder) each batch-1 call with grad off, once a size has come twice
        in a row, while no forward hook is on the encoder's modules (sam2_encoder.py). The same kernels and
        outputs, without the host's launch cost, which exceeds the encoder's GPU time at batch 1. The graph
        holds the encoder's activation memory until restore(); while it is captured, another thread that waits
        for the device gets an error (cuda_graphs); inside handle.observe() the encoder runs as is. Under
        torch.compile an image model's batch-1 encoder (grad off, CUDA) is one op that replays the
        encoder compiled by Inductor's default mode from a graph of its own, holding its own activation
        memory (sam2_encoder.py).
        handle.memory.graph_encoder switches it. None (the default): on. Given for any other model
        (segment-anything's; a bare Hiera): ValueError.
    graph_heads: for a SAM2VideoPredictor on CUDA with batch_objects, a frame's memory attention, mask
        decoder and memory encoder replay one CUDA graph per memory shape (captured when a shape comes on two
        frames in a row: once the memory stops growing, from frame 16; at most four kept; objects whose
        memories differ in length run eagerly). Same kernels and outputs, as graph_encoder; forward hooks on those modules run only while
        a graph is captured, so code that hooks them (a profiler) turns this off. handle.memory.graph_heads
        switches it. None (the default): on. Given for any other model: ValueError.
    A patched image encoder (SAM's ImageEncoderViT, SAM 2's ImageEncoder) runs its forward once more before
    the real one on its first eager call of an input signature on CUDA (grad off, no hook on its modules), inside
    kernels.compile_ahead: the attention kernels of every block then compile together, not one block after
    another at their first launch (first_call.py). handle.memory.compile_ahead = False turns that off.
    Returns a PatchHandle (handle.report, str(handle), handle.restore()).

    Raises TypeError for other objects, RuntimeError if the model (or a module in it) is already
    patched, the policy's PolicyError when it cannot build a layer's mask (e.g. a head index
    the model lacks), and ValueError for a policy the model cannot run (a sparse memory policy on
    SAM2VideoPredictorVOS, whose compiled memory attention would be compiled per memory composition). Every block mask the policy can build without prompts is built here, once
    per layer, and reused; a policy rule that matches no module of the model gives a warning.
    """
    fam = family_for(model)
    model, prefix = fam.unwrap(model)
    already = _find_patched(model)
    if already:
        raise RuntimeError(
            f"{type(model).__name__} is already patched by sam_sparse ({already[0] or 'the model itself'}); "
            "call handle.restore() or sam_sparse.unpatch_sam(model) before patching again"
        )
    policy = _load(policy)
    found, notes = fam.find_layers(model, prefix, policy.block_size)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    options = (("batch_objects", batch_objects), ("graph_encoder", graph_encoder), ("graph_heads", graph_heads))
    video_options = [(name, value) for name, value in options if name != "graph_encoder"]
    for name, value in options:
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}={value!r}: expected True, False or None")
    if not fam.is_video(model):
        given = [f"{name}={value}" for name, value in video_options if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: for a SAM2VideoPredictor's propagate_in_video; a "
                             f"{type(model).__name__} has no video to propagate (leave it out)")
    if graph_encoder is not None and not fam.graphs_encoder(model):
        raise ValueError(f"graph_encoder={graph_encoder}: for a SAM 2 model with sam2's ImageEncoder (a "
                         f"SAM2VideoPredictor's frames, or an image model at batch 1), not for a "
                         f"{type(model).__name__} (leave it out)")
    if batch_objects is None:
        batch_objects = fam.batches_objects(model)
    context = PromptContext(grid=fam.image_grid(model))
    memory = MemoryContext(batch_objects, graph_encoder is not False, graph_heads is not False)

    entries, report, geometries = [], [], []
    for module, described in found:
        kind = described.kind
        name = described.name[len(prefix):]  # the module's name in the patched model
        if _fixed(kind):
            described = _with_tiles(described, policy)
            state = LayerState(name=name, geometry=described, policy=policy)
        elif kind == "memory.cross":
            # The template keeps the nominal memory for the report; calls build their own geometry.
            state = LayerState(name=name, geometry=described, policy=policy, context=memory)
        else:
            # The per-call template: no grids until a call says how many tokens each side has.
            state = LayerState(name=name, geometry=replace(described, q_grid=None, k_grid=None), policy=policy,
                               context=context)
        geometries.append(described)  # every layer of the model, for the unmatched-rule warning
        if type(module) not in fam.SPARSE_CLASSES:
            notes.append(f"{name}: {type(module).__name__} is a subclass of the attention class with its own code: "
                         "left as is")
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        head_dim = _head_dim(module, kind)
        if head_dim not in HEAD_DIMS:
            notes.append(f"{name}: head dim {head_dim} is not one the kernel runs ({HEAD_DIMS_ACCEPTED}): left as is")
            continue
        # Build every prompt-free mask now, once: policy errors surface at patch time, layouts are kept.
        per_prompt = not _fixed(kind) and kind != "memory.cross" and policy.needs_prompts(described)
        if _fixed(kind):
            layout = state.encoder_layout(device)
        elif kind == "memory.cross":
            layout = memory_block_layout(state, (described.memory,), False, device)
        elif per_prompt:
            policy.block_mask(described, None, device)  # validates the rules (head indices etc.)
            layout = None  # built per call, from the call's prompts
        else:
            layout = state.decoder_layout(described.seqlen_q, described.seqlen_k, 1, device)
        entries.append((module, type(module), state))
        report.append(LayerReport(
            name=name, kind=kind, pattern=_pattern_text(policy, described, layout is None, per_prompt),
            density=None if per_prompt else (1.0 if layout is None else layout.density()), heads=module.num_heads,
            grid=_grid_text(described), block_size=described.block_size, key_tile=described.key_tile,
        ))
    refused = fam.refusal(model, policy, [state.geometry for _, _, state in entries])
    if refused:
        raise ValueError(refused)
    _warn_unmatched(policy, geometries)
    _warn_if_nothing_sparse(policy, report, notes)
    _warn_if_no_prompts(policy, report, fam.hook_targets(model)[0] is not None)
    handle = PatchHandle(model, policy, entries, report, notes, context, fam.NAME, memory)
    handle.enable()
    return handle


def _pattern_text(policy, layer: LayerGeometry, dense: bool, per_prompt: bool) -> str:
    """The patterns that decide the layer's heads ("local2d", "dense/local2d" for mixed heads)."""
    if dense and not per_prompt:
        return "dense"
    head_rules = getattr(policy, "head_rules", None)
    if head_rules is None:
        text = "block-sparse"
    else:
        names = []
        for i in head_rules(layer):
            n = "dense" if i is None else policy.rules[i].pattern.describe()
            if n not in names:
                names.append(n)
        text = "/".join(names)
    return text + (" (per prompt)" if per_prompt else "")


class PolicyWarning(UserWarning):
    """A policy that does not do what it says on this model (filter with warnings.filterwarnings)."""


def _warn_unmatched(policy, geometries: List[LayerGeometry]) -> None:
    """A PolicyWarning for each rule that matches none of the model's attention layers (Policy.unmatched_rules:
    rules for layer kinds this model does not have, such as MobileSAM's encoder, are expected)."""
    unmatched = getattr(policy, "unmatched_rules", None)
    if unmatched is None or not geometries:
        return
    for i in unmatched(geometries):
        rule = policy.rules[i]
        what = rule.describe(i) if hasattr(rule, "describe") else f"rule {i}"
        kinds = ", ".join(dict.fromkeys(g.kind for g in geometries))
        warnings.warn(f"policy {policy.name!r}: {what} matches no attention module of this model "
                      f"(its attention layers: {kinds})", PolicyWarning, stacklevel=3)


def _warn_if_nothing_sparse(policy, report: List[LayerReport], notes: List[str]) -> None:
    """A PolicyWarning when a sparse policy leaves every patched layer of this model dense: it changes
    nothing here (local2d-30 on MobileSAM, whose TinyViT encoder is not patched)."""
    if not report or any(r.pattern != "dense" for r in report):
        return
    if all(getattr(r.pattern, "name", None) == "dense" for r in getattr(policy, "rules", ())):
        return  # a dense policy: dense is what was asked for
    why = f" ({notes[0]})" if notes else ""
    warnings.warn(f"policy {policy.name!r} leaves every patched layer of this model dense: it changes nothing "
                  f"here{why}", PolicyWarning, stacklevel=3)


def _warn_if_no_prompts(policy, report: List[LayerReport], sees_prompts: bool) -> None:
    """A PolicyWarning when layers are per prompt but no prompt encoder is part of what was patched (a
    MaskDecoder or TwoWayTransformer alone): no call's prompts reach them, so they run dense."""
    per_prompt = [r.name for r in report if r.density is None]
    if per_prompt and not sees_prompts:
        warnings.warn(f"policy {policy.name!r} makes {len(per_prompt)} layer(s) depend on the prompts "
                      f"({per_prompt[0]}, ...), but the prompt encoder is not part of what was patched: no "
                      "prompts reach them, so they run dense. Patch the whole model (a Sam, a SAM 2 model or "
                      "its predictor)", PolicyWarning, stacklevel=3)


def unpatch_sam(model) -> None:
    """Restore a model patched by patch_sam (the same as handle.restore()): a no-op when nothing of it is
    patched (restored already, or never patched). model: what patch_sam was given (a predictor or generator
    too). RuntimeError for a part of a larger patched model: restoring it alone would leave the rest patched."""
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_sam takes the torch.nn.Module given to patch_sam, got {type(model).__name__}")
    handle = getattr(model, "_sam_sparse_handle", None)
    if handle is None:
        own = [n for n, m in model.named_modules() if n and hasattr(m, "_sam_sparse_handle")]
        if own:  # a part was patched on its own: patch_sam(model.image_encoder, ...)
            raise RuntimeError(f"{own[0]} was patched on its own, not this model: unpatch_sam(model.{own[0]}) "
                               "(or its handle's restore()) undoes it")
        if _find_patched(model):
            raise RuntimeError(f"this {type(model).__name__} was patched as part of a larger model; unpatch that "
                               "model (or use its handle)")
        return
    handle.restore()
