"""SAM 2 video under patch_sam: the model classes that record each memory call's structure, the
batched propagation (every object of a frame as one batch) and the graphed image encoder.

patch_sam swaps the class of a SAM2VideoPredictor / SAM2VideoPredictorVOS for the subclass here
(SPARSE_MODELS), as it swaps attention classes; restore() swaps it back. An image model (a bare SAM2Base,
what SAM2ImagePredictor and build_sam2 give) keeps its class: it never builds a memory, and a memory call
without a record is taken as all conditioning frames, which memory-local keeps whole. Three things change:

- _prepare_memory_conditioned_features (SAM 2's per-object path) records how many conditioning frames
  lead the memory (patches/memory.MemoryCall) while SAM 2's own code builds the memory and calls the
  memory attention; a policy's memory.cross mask needs it (memory-local keeps prompted frames dense).
- forward_image (SAM2VideoPredictor, when the handle's MemoryContext.graph_encoder is on and the frame is
  on CUDA): replayed from a CUDA graph (cuda_graphs.GraphedFunction), since at batch 1 the host's kernel
  launches take longer than the encoder's GPU work. The same for a batch's memory attention, mask decoder
  and memory encoder (graph_heads), once per memory shape, when every object's memory has the same shape.
- propagate_in_video (video predictors, when the handle's MemoryContext.batch_objects is on): per frame,
  the objects that are tracked there run as one batch: one memory attention call (their memories
  stacked, or packed one after the other when their lengths differ: the kernel's varlen path), one mask
  decoder call, one memory encoder call. Each object's memory is gathered exactly as
  _prepare_memory_conditioned_features gathers it (object_memory), and each object's output dict is
  the one SAM 2's per-object loop stores, so add_new_points_or_box, remove_object, reset_state and
  later propagations keep working on the same inference state.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from sam2.modeling.sam2_base import SAM2Base
from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames
from sam2.sam2_video_predictor import SAM2VideoPredictor, SAM2VideoPredictorVOS
from sam2.utils.misc import fill_holes_in_mask_scores

from ..cuda_graphs import GraphedFunction, module_storage
from ..geometry import MemoryLayout
from .memory import MemoryCall, MemoryContext, PackedKeys
from .patcher import observing
from .sam2_memory import packable


def memory_context(model) -> Optional[MemoryContext]:
    handle = getattr(model, "_sam_sparse_handle", None)
    return getattr(handle, "memory", None) if handle is not None else None


class _RecordsMemory:
    """SAM2Base._prepare_memory_conditioned_features, recording the conditioning frames of its memory."""

    def _prepare_memory_conditioned_features(self, frame_idx, is_init_cond_frame, current_vision_feats,
                                             current_vision_pos_embeds, feat_sizes, output_dict, num_frames,
                                             track_in_reverse=False):
        args = (frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds, feat_sizes, output_dict,
                num_frames, track_in_reverse)
        ctx = memory_context(self)
        if ctx is None or is_init_cond_frame or self.num_maskmem == 0:
            return super()._prepare_memory_conditioned_features(*args)
        # SAM 2 puts the selected conditioning frames first (every one has a memory by then).
        selected, _ = select_closest_cond_frames(frame_idx, output_dict["cond_frame_outputs"],
                                                 self.max_cond_frames_in_attn)
        rows = current_vision_feats[-1].size(1)
        with ctx.call(MemoryCall((len(selected),) * rows)):
            return super()._prepare_memory_conditioned_features(*args)


class _GraphedEncoder:
    """SAM2Base.forward_image (a video frame's image encoder, batch 1) replayed from a CUDA graph per input
    signature when the handle's MemoryContext.graph_encoder is on, nobody observes the patched modules and
    the frame is on CUDA: at batch 1 the host's kernel launches take longer than the encoder's GPU work.
    Same kernels, same outputs (copies of the graph's). The graph is keyed by the encoder's parameter
    storage too (moving or recasting the model makes a new one) and dropped by restore()."""

    def forward_image(self, img_batch):
        ctx = memory_context(self)
        if ctx is None or not ctx.graph_encoder or observing(self) or not img_batch.is_cuda:
            return super().forward_image(img_batch)
        with _GRAPH_LOCK:  # two threads on a first frame: one graph
            if ctx.encoder_graph is None:
                ctx.encoder_graph = GraphedFunction(super().forward_image, state=functools.partial(
                    module_storage, self.image_encoder, self.sam_mask_decoder))
        return ctx.encoder_graph(img_batch)


_GRAPH_LOCK = threading.Lock()


class _GraphedHeads:
    """A batch's memory attention, mask decoder and memory encoder (stacked_frame) replayed from a CUDA graph
    per memory shape when the handle's MemoryContext.graph_heads is on and nobody observes the patched
    modules: with few objects the host's launches take longer than their GPU work. A shape is captured when
    it comes on two frames in a row (once the memory stops growing: SAM 2's 7 frames and 16 object pointers,
    from frame 16 on; while it fills, each frame's shape differs from the last), four graphs at most are
    kept, keyed also by what heads_storage gives (parameters, cached layouts and tables, the model's
    settings), and restore() drops them."""

    def _stacked_heads(self, ctx, device):
        if not ctx.graph_heads or observing(self) or device.type != "cuda":
            return super()._stacked_heads(ctx, device)
        with _GRAPH_LOCK:
            if ctx.heads_graph is None:
                ctx.heads_graph = GraphedFunction(functools.partial(stacked_frame, self, ctx), capture_after=1,
                                                  max_graphs=4, state=functools.partial(heads_storage, self))
        return ctx.heads_graph


def heads_storage(model: SAM2Base) -> tuple:
    """What a graph of stacked_frame reads besides its arguments: every parameter and buffer but the image
    encoder's, how often each patched memory attention let a cached layout or RoPE table go, and the
    model's and its mask decoder's settings (multimask_output_for_tracking, sigmoid_scale_for_mem_enc,
    training, ...: a capture bakes them in)."""
    parts = [m for name, m in model.named_children() if name != "image_encoder"]
    own = tuple((t.data_ptr(), t.shape, t.dtype) for t in (*model.parameters(recurse=False),
                                                             *model.buffers(recurse=False)))
    dropped = tuple(m._sam_sparse.dropped for m in model.memory_attention.modules() if hasattr(m, "_sam_sparse"))
    settings = tuple((k, v) for m in (model, model.sam_mask_decoder) for k, v in vars(m).items()
                     if isinstance(v, (bool, int, float, str, type(None))))
    return module_storage(*parts) + own + (dropped, settings)


class _BatchedPropagation:
    """SAM2VideoPredictor.propagate_in_video with the tracked objects of each frame as one batch."""

    def _stacked_heads(self, ctx, device):
        """stacked_frame for this model (a graph of it in _GraphedHeads)."""
        return functools.partial(stacked_frame, self, ctx)

    @torch.inference_mode()
    def propagate_in_video(self, inference_state, start_frame_idx=None, max_frame_num_to_track=None, reverse=False):
        ctx = memory_context(self)
        if ctx is None or not ctx.batch_objects:
            yield from super().propagate_in_video(inference_state, start_frame_idx, max_frame_num_to_track, reverse)
            return
        self.propagate_in_video_preflight(inference_state)
        state = inference_state
        obj_ids = state["obj_ids"]
        num_objects = self._get_obj_num(state)
        per_obj = state["output_dict_per_obj"]
        device = state["device"]
        for frame_idx in processing_order(state, start_frame_idx, max_frame_num_to_track, reverse):
            masks: List[Optional[torch.Tensor]] = [None] * num_objects
            tracked = []
            for obj_idx in range(num_objects):
                stored = per_obj[obj_idx]["cond_frame_outputs"].get(frame_idx)
                if stored is None:
                    tracked.append(obj_idx)
                    continue
                # a prompted frame: its output is already consolidated (as SAM 2's loop does)
                masks[obj_idx] = stored["pred_masks"].to(device, non_blocking=True)
                if self.clear_non_cond_mem_around_input:
                    self._clear_obj_non_cond_mem_around_input(state, frame_idx, obj_idx)
            if tracked:
                outs, pred_masks = track_objects(self, ctx, state, frame_idx, tracked, reverse)
                for j, obj_idx in enumerate(tracked):
                    per_obj[obj_idx]["non_cond_frame_outputs"][frame_idx] = outs[j]
                    masks[obj_idx] = pred_masks[j:j + 1]
            for obj_idx in range(num_objects):
                state["frames_tracked_per_obj"][obj_idx][frame_idx] = {"reverse": reverse}
            all_masks = torch.cat(masks, dim=0) if len(masks) > 1 else masks[0]
            _, video_res_masks = self._get_orig_video_res_output(state, all_masks)
            yield frame_idx, obj_ids, video_res_masks


def processing_order(state, start_frame_idx, max_frame_num_to_track, reverse) -> range:
    """The frames propagate_in_video visits, by SAM 2's rules: from the earliest prompted frame (or
    start_frame_idx) forward to the end, or backward to frame 0, at most max_frame_num_to_track frames."""
    num_frames = state["num_frames"]
    if start_frame_idx is None:
        start_frame_idx = min(t for out in state["output_dict_per_obj"].values() for t in out["cond_frame_outputs"])
    if max_frame_num_to_track is None:
        max_frame_num_to_track = num_frames
    if reverse:
        end = max(start_frame_idx - max_frame_num_to_track, 0)
        return range(start_frame_idx, end - 1, -1) if start_frame_idx > 0 else range(0)
    end = min(start_frame_idx + max_frame_num_to_track, num_frames - 1)
    return range(start_frame_idx, end + 1)


@dataclass
class ObjectMemory:
    """One object's memory for one frame, as SAM 2 concatenates it: memory, pos (keys, 1, mem_dim); the
    frames (conditioning first) and pointer tokens in it."""

    memory: torch.Tensor
    pos: torch.Tensor
    cond_frames: int
    frames: int
    pointer_tokens: int

    def layout(self, grid) -> MemoryLayout:
        return MemoryLayout((True,) * self.cond_frames + (False,) * (self.frames - self.cond_frames), grid,
                            self.pointer_tokens)


def object_memory(model: SAM2Base, output_dict: Dict, frame_idx: int, num_frames: int, reverse: bool,
                  device: torch.device) -> ObjectMemory:
    """One object's memory on a tracked frame: what _prepare_memory_conditioned_features builds for one
    object (batch 1) before it calls the memory attention, by the same rules and in the same order: the
    selected conditioning frames (t_pos 0), the last num_maskmem - 1 frames (strided), then the object
    pointers (conditioning frames in the past, then up to max_obj_ptrs_in_encoder - 1 recent frames)."""
    C = model.hidden_dim
    cond_outputs = output_dict["cond_frame_outputs"]
    selected, unselected = select_closest_cond_frames(frame_idx, cond_outputs, model.max_cond_frames_in_attn)
    t_pos_and_prevs = [(0, out) for out in selected.values()]
    stride = 1 if model.training else model.memory_temporal_stride_for_eval
    step = 1 if reverse else -1  # towards the frames already tracked
    for t_pos in range(1, model.num_maskmem):
        t_rel = model.num_maskmem - t_pos  # frames back from the current one
        if t_rel == 1:
            prev_idx = frame_idx + step
        elif not reverse:
            prev_idx = ((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride
        else:
            prev_idx = -(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride
        out = output_dict["non_cond_frame_outputs"].get(prev_idx)
        if out is None:
            out = unselected.get(prev_idx)  # an unselected prompted frame counts as a tracked one here
        t_pos_and_prevs.append((t_pos, out))
    feats, pos = [], []
    for t_pos, prev in t_pos_and_prevs:
        if prev is None:
            continue
        feats.append(prev["maskmem_features"].to(device, non_blocking=True).flatten(2).permute(2, 0, 1))
        enc = prev["maskmem_pos_enc"][-1].to(device).flatten(2).permute(2, 0, 1)
        pos.append(enc + model.maskmem_tpos_enc[model.num_maskmem - t_pos - 1])
    frames = len(feats)
    pointer_tokens = 0
    if model.use_obj_ptrs_in_encoder:
        max_ptrs = min(num_frames, model.max_obj_ptrs_in_encoder)
        ptr_cond = selected
        if not model.training and model.only_obj_ptrs_in_the_past_for_eval:
            ptr_cond = {t: out for t, out in selected.items() if (t >= frame_idx if reverse else t <= frame_idx)}
        sign = -1 if reverse else 1
        pos_and_ptrs = [((frame_idx - t) * sign if model.use_signed_tpos_enc_to_obj_ptrs else abs(frame_idx - t),
                         out["obj_ptr"]) for t, out in ptr_cond.items()]
        for t_diff in range(1, max_ptrs):
            t = frame_idx + t_diff if reverse else frame_idx - t_diff
            if t < 0 or (num_frames is not None and t >= num_frames):
                break
            out = output_dict["non_cond_frame_outputs"].get(t, unselected.get(t, None))
            if out is not None:
                pos_and_ptrs.append((t_diff, out["obj_ptr"]))
        if pos_and_ptrs:
            pos_list, ptrs_list = zip(*pos_and_ptrs)
            obj_ptrs = torch.stack(ptrs_list, dim=0)  # (pointers, 1, C)
            if model.add_tpos_enc_to_obj_ptrs:
                t_diff_max = max_ptrs - 1
                tpos_dim = C if model.proj_tpos_enc_in_obj_ptrs else model.mem_dim
                obj_pos = torch.tensor(pos_list).to(device=device, non_blocking=True)
                obj_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(obj_pos / t_diff_max, dim=tpos_dim))
                obj_pos = obj_pos.unsqueeze(1).expand(-1, 1, model.mem_dim)
            else:
                obj_pos = obj_ptrs.new_zeros(len(pos_list), 1, model.mem_dim)
            if model.mem_dim < C:  # a pointer becomes C / mem_dim tokens
                obj_ptrs = obj_ptrs.reshape(-1, 1, C // model.mem_dim, model.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
                obj_pos = obj_pos.repeat_interleave(C // model.mem_dim, dim=0)
            feats.append(obj_ptrs)
            pos.append(obj_pos)
            pointer_tokens = obj_ptrs.shape[0]
    return ObjectMemory(torch.cat(feats, dim=0), torch.cat(pos, dim=0), len(selected), frames, pointer_tokens)


def stack_memories(memories: Sequence[ObjectMemory]) -> Optional[tuple]:
    """(memory, memory_pos (keys, B, mem_dim), conds, pointer_tokens) of B objects whose memories have one
    shape (the same frames and pointer tokens), stacked along the batch as attend_stacked takes them; conds[b]
    the conditioning frames leading object b's. None when their shapes differ."""
    if len({(m.frames, m.pointer_tokens) for m in memories}) != 1:
        return None
    return (torch.cat([m.memory for m in memories], dim=1), torch.cat([m.pos for m in memories], dim=1),
            tuple(m.cond_frames for m in memories), memories[0].pointer_tokens)


def attend_stacked(model: SAM2Base, ctx: MemoryContext, curr: torch.Tensor, curr_pos: torch.Tensor,
                   memory: torch.Tensor, memory_pos: torch.Tensor, conds: Tuple[int, ...],
                   pointer_tokens: int) -> torch.Tensor:
    """model.memory_attention (through __call__) on B objects whose memories have one shape: curr, curr_pos
    (N, B, C); memory, memory_pos (keys, B, mem_dim), conds[b] conditioning frames leading object b's."""
    with ctx.call(MemoryCall(conds)):
        return model.memory_attention(curr=[curr], curr_pos=[curr_pos], memory=memory, memory_pos=memory_pos,
                                      num_obj_ptr_tokens=pointer_tokens)


def memory_conditioned(model: SAM2Base, ctx: MemoryContext, curr: torch.Tensor, curr_pos: torch.Tensor,
                       grid: Tuple[int, int], memories: Sequence[ObjectMemory]) -> torch.Tensor:
    """The memory attention for a batch of objects on one frame: curr, curr_pos (N, B, C) -> (N, B, C).

    One call of model.memory_attention (through __call__) when every object's memory has the same frames
    and pointer tokens (stacked as (keys, B, mem_dim)) or when it can take them packed (varlen); otherwise
    (SAM2VideoPredictorVOS's compiled memory attention) one call per group of equal shapes."""
    stacked = stack_memories(memories)
    if stacked is not None:
        return attend_stacked(model, ctx, curr, curr_pos, *stacked)
    conds = tuple(m.cond_frames for m in memories)
    shapes = [(m.frames, m.pointer_tokens) for m in memories]
    if packable(model.memory_attention):
        packed = PackedKeys.build([m.layout(grid) for m in memories], curr.device)
        with ctx.call(MemoryCall(conds, packed)):
            return model.memory_attention(curr=[curr], curr_pos=[curr_pos],
                                          memory=torch.cat([m.memory for m in memories], dim=0),
                                          memory_pos=torch.cat([m.pos for m in memories], dim=0))
    out = torch.empty_like(curr)
    for shape in dict.fromkeys(shapes):
        rows = [i for i, s in enumerate(shapes) if s == shape]
        index = torch.tensor(rows, device=curr.device)
        out[:, index] = memory_conditioned(model, ctx, curr[:, index], curr_pos[:, index], grid,
                                           [memories[i] for i in rows])
    return out


def frame_heads(model: SAM2Base, feats: Sequence[torch.Tensor], feat_sizes, pix: torch.Tensor) -> tuple:
    """The mask decoder and memory encoder of a batch of B tracked objects: feats, the frame's backbone
    features per level (N_l, B, C_l); pix, the memory-conditioned features (N, B, C). Returns low_res_masks
    (B, 1, H/4, W/4), obj_ptr (B, C), object_score_logits (B, 1), maskmem_features in bfloat16 and
    maskmem_pos_enc (None without a memory), as SAM 2's _run_single_frame_inference makes them."""
    B, C = pix.shape[1], model.hidden_dim
    H, W = feat_sizes[-1]
    pix = pix.permute(1, 2, 0).view(B, C, H, W)
    high_res = None
    if len(feats) > 1:
        high_res = [x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], feat_sizes[:-1])]
    sam_outputs = model._forward_sam_heads(backbone_features=pix, point_inputs=None, mask_inputs=None,
                                           high_res_features=high_res,
                                           multimask_output=model._use_multimask(False, None))
    _, _, _, low_res_masks, high_res_masks, obj_ptr, object_score_logits = sam_outputs
    features = pos_enc = None
    if model.num_maskmem > 0:
        features, pos_enc = encode_memories(model, feats, feat_sizes, high_res_masks, object_score_logits)
        features = features.to(torch.bfloat16)
    return low_res_masks, obj_ptr, object_score_logits, features, pos_enc


def stacked_frame(model: SAM2Base, ctx: MemoryContext, *tensors: torch.Tensor, feat_sizes, conds: Tuple[int, ...],
                  pointer_tokens: int) -> tuple:
    """attend_stacked, then frame_heads: tensors are the frame's features per level, the last level's
    position encoding, then the stacked memory and its position encoding. A pure function of its arguments
    and the model (one CUDA graph per signature in _GraphedHeads)."""
    *feats, pos, memory, memory_pos = tensors
    pix = attend_stacked(model, ctx, feats[-1], pos, memory, memory_pos, conds, pointer_tokens)
    return frame_heads(model, feats, feat_sizes, pix)


def track_objects(model: SAM2VideoPredictor, ctx: MemoryContext, state: Dict, frame_idx: int,
                  objects: List[int], reverse: bool) -> Tuple[List[Dict], torch.Tensor]:
    """Track `objects` (model-side indices) on a frame none of them was prompted on, as one batch.

    Returns each object's compact output dict (what SAM 2's _run_single_frame_inference returns for it:
    maskmem_features in bfloat16 on the storage device, maskmem_pos_enc, pred_masks, obj_ptr,
    object_score_logits) and pred_masks (objects, 1, H/4, W/4) on the compute device."""
    B = len(objects)
    device = state["device"]
    _, _, feats, pos_embeds, feat_sizes = model._get_image_feature(state, frame_idx, B)
    sizes = tuple(tuple(s) for s in feat_sizes)
    memories = [object_memory(model, state["output_dict_per_obj"][i], frame_idx, state["num_frames"], reverse, device)
                for i in objects]
    stacked = stack_memories(memories)
    if stacked is not None:
        memory, memory_pos, conds, pointer_tokens = stacked
        heads = model._stacked_heads(ctx, feats[-1].device)
        outputs = heads(*feats, pos_embeds[-1], memory, memory_pos, feat_sizes=sizes, conds=conds,
                        pointer_tokens=pointer_tokens)
    else:
        pix = memory_conditioned(model, ctx, feats[-1], pos_embeds[-1], sizes[-1], memories)
        outputs = frame_heads(model, feats, sizes, pix)
    low_res_masks, obj_ptr, object_score_logits, maskmem_features, maskmem_pos_enc = outputs
    storage = state["storage_device"]
    if maskmem_features is not None:
        maskmem_features = maskmem_features.to(storage, non_blocking=True)
    pred_masks_gpu = low_res_masks
    if model.fill_hole_area > 0:
        pred_masks_gpu = fill_holes_in_mask_scores(pred_masks_gpu, model.fill_hole_area)
    pred_masks = pred_masks_gpu.to(storage, non_blocking=True)
    outs = []
    for j in range(B):
        pos_enc = None if maskmem_pos_enc is None else [x[j:j + 1] for x in maskmem_pos_enc]
        outs.append({
            "maskmem_features": None if maskmem_features is None else maskmem_features[j:j + 1],
            "maskmem_pos_enc": model._get_maskmem_pos_enc(state, {"maskmem_pos_enc": pos_enc}),
            "pred_masks": pred_masks[j:j + 1],
            "obj_ptr": obj_ptr[j:j + 1],
            "object_score_logits": object_score_logits[j:j + 1],
        })
    return outs, pred_masks_gpu


def encode_memories(model: SAM2Base, feats, feat_sizes, high_res_masks, object_score_logits):
    """The memory encoder on the batch (tracked masks: is_mask_from_pts False). With
    non_overlap_masks_for_mem_enc each object is encoded alone, as in SAM 2's per-object loop: that option
    couples the objects of a batch."""
    if not model.non_overlap_masks_for_mem_enc or high_res_masks.shape[0] == 1:
        return model._encode_new_memory(current_vision_feats=feats, feat_sizes=feat_sizes,
                                        pred_masks_high_res=high_res_masks, object_score_logits=object_score_logits,
                                        is_mask_from_pts=False)
    parts = [model._encode_new_memory(current_vision_feats=[f[:, j:j + 1] for f in feats], feat_sizes=feat_sizes,
                                      pred_masks_high_res=high_res_masks[j:j + 1],
                                      object_score_logits=object_score_logits[j:j + 1], is_mask_from_pts=False)
             for j in range(high_res_masks.shape[0])]
    features = torch.cat([p[0] for p in parts], dim=0)
    pos_enc = [torch.cat([p[1][i] for p in parts], dim=0) for i in range(len(parts[0][1]))]
    return features, pos_enc


class SparseSAM2VideoPredictor(_GraphedEncoder, _GraphedHeads, _BatchedPropagation, _RecordsMemory,
                               SAM2VideoPredictor):
    """SAM2VideoPredictor under patch_sam: memory calls recorded, objects of a frame batched, the image
    encoder and a batch's heads replayed from CUDA graphs."""


class SparseSAM2VideoPredictorVOS(_BatchedPropagation, _RecordsMemory, SAM2VideoPredictorVOS):
    """SAM2VideoPredictorVOS under patch_sam (its compiled memory attention takes no packed memory: objects
    whose memories differ in shape run in one call per shape; SAM 2 compiles its image encoder and heads,
    with CUDA graphs of their own, so no graph here)."""


# Original model class -> the class patch_sam gives it. Exact classes only: a subclass may have its own code.
SPARSE_MODELS = {SAM2VideoPredictor: SparseSAM2VideoPredictor,
                 SAM2VideoPredictorVOS: SparseSAM2VideoPredictorVOS}
