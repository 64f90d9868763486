"""Video parity for SAM 2: propagate prompts over a clip with the predictor unpatched, patched per object and
patched batched, and compare every frame.

    report = video_parity(predictor, "clip/", [{"frame": 0, "obj_id": 1, "points": [[320, 240]], "labels": [1]}],
                          "dense")
    print(report); assert report.passed

The predictor is a sam2 SAM2VideoPredictor, unpatched (it is patched and restored here), or a callable
returning one. Runs are SAM 2's own calls: init_state, add_new_points_or_box, propagate_in_video.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..table import format_table
from .parity import DENSE_HALF
from .patcher import patch_sam

PROMPT_KEYS = ("frame", "obj_id", "points", "labels", "box")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".JPEG")  # what sam2's init_state reads from a frames folder


@dataclass(frozen=True)
class FrameParity:
    """One output frame. iou / max_logit_err: the patched batched run vs SAM 2 unpatched (worst object:
    lowest mask IoU, largest |logit difference|); object_iou / object_max_logit_err: patched batched vs
    patched per object (batching alone). Masks are logits > 0 at the video's resolution. direction: "forward"
    or "reverse" (the propagation that gave the frame)."""

    frame: int
    iou: float
    max_logit_err: float
    object_iou: float
    object_max_logit_err: float
    direction: str = "forward"


@dataclass
class VideoParityReport:
    """Per-frame parity of one policy on one clip, in output order (forward, then reverse if asked).

    passed: every frame's batched vs per-object within `batch_min_iou` / `batch_max_logit_err` (batching must cost
    nothing: 1.0 / 1e-3 in fp32, DENSE_HALF's 0.9 / 2.0 under autocast or half weights), and, where `gated`, its
    masks against SAM 2 within `min_iou` / `max_logit_err` (set by video_parity: the caller's; for a dense policy
    by default the batching's bar, the same masks; a sparse policy without the caller's is not gated: its masks
    against SAM 2 are reported, not judged).
    error_growth: over the forward frames whose memory holds a tracked frame (one no prompt is on: the frames
    before the first of them read prompted frames only, or none, so their error says nothing of accumulation),
    max logit error of the last third over the first third's (about 1 or below when errors do not accumulate
    through the memory); nan with fewer than 2 such frames.
    """

    policy: str
    objects: int
    frames: List[FrameParity] = field(default_factory=list)
    min_iou: float = 1.0
    max_logit_err: float = 1e-3
    batch_min_iou: float = 1.0
    batch_max_logit_err: float = 1e-3
    dense: bool = True
    gated: bool = True  # whether the thresholds judge the masks against SAM 2 (not only the batching)
    prompted: Tuple[int, ...] = ()  # the frames the prompts are on

    @property
    def error_growth(self) -> float:
        errs, tracked = [], False
        for f in self.frames:
            if f.direction != "forward" or f.frame in self.prompted:
                continue
            if tracked:
                errs.append(f.max_logit_err)
            tracked = True  # the frames after this one hold it in their memory
        if len(errs) < 2:
            return float("nan")
        third = max(1, len(errs) // 3)
        first, last = max(errs[:third]), max(errs[-third:])
        return last / first if first > 0 else (0.0 if last == 0 else float("inf"))

    def failures(self) -> List[str]:
        out = []
        for f in self.frames:
            checks = [("batched vs per-object", f.object_iou, f.object_max_logit_err, self.batch_min_iou,
                       self.batch_max_logit_err)]
            if self.gated:
                checks.insert(0, ("patched vs SAM 2", f.iou, f.max_logit_err, self.min_iou, self.max_logit_err))
            for what, iou, err, min_iou, max_err in checks:
                if iou < min_iou or err > max_err:
                    out.append(f"frame {f.frame} ({f.direction}): {what}: mask IoU {iou:.4f} (>= {min_iou}), "
                               f"max logit error {err:.3g} (<= {max_err:g})")
        return out

    @property
    def passed(self) -> bool:
        return bool(self.frames) and not self.failures()

    def __str__(self) -> str:
        rows = [(str(f.frame), f.direction, f"{f.iou:.4f}", f"{f.max_logit_err:.3g}", f"{f.object_iou:.4f}",
                 f"{f.object_max_logit_err:.3g}") for f in self.frames]
        head = (f"video parity, policy {self.policy!r}, {self.objects} objects, {len(self.frames)} frames: "
                f"{'passed' if self.passed else 'FAILED'}; error growth (last third / first third of the frames "
                f"whose memory holds a tracked frame) {self.error_growth:.3g}")
        if not self.gated:
            head += ("\nthe masks against SAM 2 are not judged (a sparse policy without min_iou / max_logit_err): "
                     "read the IoU column, or pass thresholds")
        table = format_table(("frame", "direction", "IoU vs SAM 2", "max logit err", "IoU batched vs per-object",
                              "max logit err"), rows)
        return "\n".join([head, table, *self.failures()])


def _check_prompts(prompts: Sequence[Dict]) -> List[Dict]:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: expected a non-empty list of {frame, obj_id, points + labels and/or box}")
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or "frame" not in p or "obj_id" not in p:
            raise ValueError(f"prompts[{i}]: expected a dict with frame, obj_id and points + labels or box, got {p!r}")
        unknown = set(p) - set(PROMPT_KEYS)
        if unknown:
            raise ValueError(f"prompts[{i}]: unknown keys {sorted(unknown)}; accepted: {', '.join(PROMPT_KEYS)}")
        if "box" not in p and ("points" not in p or "labels" not in p):
            raise ValueError(f"prompts[{i}]: give points with labels, or a box")
    return list(prompts)


def _run(predictor, frames_dir: str, prompts: List[Dict], max_frames: Optional[int], reverse: bool):
    """{(direction, frame): mask logits (objects, 1, H, W)} of one run."""
    out = {}
    with torch.inference_mode():
        state = predictor.init_state(frames_dir)
        for p in prompts:
            predictor.add_new_points_or_box(state, p["frame"], p["obj_id"], points=p.get("points"),
                                            labels=p.get("labels"), box=p.get("box"))
        for f, _, logits in predictor.propagate_in_video(state, max_frame_num_to_track=max_frames):
            out[("forward", f)] = logits.float().cpu()
        if reverse:
            start = max(f for d, f in out)
            for f, _, logits in predictor.propagate_in_video(state, start_frame_idx=start, reverse=True,
                                                             max_frame_num_to_track=max_frames):
                out[("reverse", f)] = logits.float().cpu()
    return out


def _reverse_start(frames_dir: str, prompts: List[Dict], max_frames: Optional[int]) -> int:
    """The frame a reverse run starts from: the last frame the forward propagation reaches (SAM 2's: from the
    first prompted frame, max_frames more or to the clip's last JPEG)."""
    n = sum(1 for name in os.listdir(frames_dir) if os.path.splitext(name)[1] in FRAME_SUFFIXES)
    first = min(int(p["frame"]) for p in prompts)
    return n - 1 if max_frames is None else min(n - 1, first + max_frames)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per leading index of bool masks (..., h, w), float64; 1.0 where both are empty."""
    inter = (a & b).flatten(-2).sum(-1).double()
    union = (a | b).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _compare(a: torch.Tensor, b: torch.Tensor):
    """(worst mask IoU, max abs difference) of two runs' logits (objects, 1, h, w)."""
    return float(mask_iou(a > 0, b > 0).min()), float((a - b).abs().max())


def video_parity(
    predictor: Union[object, Callable[[], object]],
    frames_dir: Union[str, os.PathLike],
    prompts: Sequence[Dict],
    policy="dense",
    *,
    max_frames: Optional[int] = None,
    reverse: bool = False,
    min_iou: Optional[float] = None,
    max_logit_err: Optional[float] = None,
) -> VideoParityReport:
    """Propagate `prompts` through a clip three ways and compare every output frame.

    predictor: an unpatched sam2 SAM2VideoPredictor (patched with `policy` and restored here), or a
        zero-argument callable returning one (called once).
    frames_dir: a folder of JPEG frames, as SAM 2's init_state reads it.
    prompts: [{"frame": int, "obj_id": int, "points": [[x, y], ...], "labels": [1 | 0, ...]} or with
        "box": [x0, y0, x1, y1]], in video pixels, applied in order with add_new_points_or_box.
    policy: what patch_sam takes (a name, a YAML path, a Policy).
    max_frames: frames to track (propagate_in_video's max_frame_num_to_track); None: to the end.
    reverse: also propagate backwards from the last forward frame. SAM 2 itself fails there in float32 unless a
        prompt is on that frame (its bfloat16 memory features meet float32 weights): refused, before any run,
        unless under torch.autocast (bfloat16) or with such a prompt.
    min_iou, max_logit_err: the pass thresholds of the masks against SAM 2, for any policy (a sparse policy given
        one alone: the other is not checked). Default: for a dense policy the same masks (1.0 and 1e-3, fp32
        rounding; DENSE_HALF's 0.9 and 2.0 under autocast or with half-precision weights); a sparse policy's
        masks are reported, not judged. Batched vs per-object is always held to the same-masks bar.
    Returns a VideoParityReport: per frame, the patched batched run vs SAM 2 unpatched, and batched vs
    per-object (both patched). ValueError for malformed prompts, reverse in float32 and the policy's errors
    (PolicyError, a policy the predictor refuses), before anything runs.
    """
    prompts = _check_prompts(prompts)
    model = predictor() if callable(predictor) and not isinstance(predictor, torch.nn.Module) else predictor
    if hasattr(model, "_sam_sparse_handle"):
        raise RuntimeError("video_parity needs the unpatched predictor (it patches and restores it); "
                           "restore the patch first")
    weight = next(model.parameters())
    half = weight.dtype != torch.float32 or torch.is_autocast_enabled(weight.device.type)
    frames_dir = os.fspath(frames_dir)
    start = _reverse_start(frames_dir, prompts, max_frames) if reverse and not half else None
    if start is not None and start not in {int(p["frame"]) for p in prompts}:
        raise ValueError(f"reverse=True in float32 from frame {start}, the last forward frame, which no prompt is on: "
                         "SAM 2 itself fails there (a memory without object pointers: its bfloat16 memory features "
                         "meet float32 weights); call video_parity inside torch.autocast(device, "
                         "dtype=torch.bfloat16), as SAM 2's README runs it, or put a prompt on that frame")
    patch_sam(model, policy).restore()  # a bad or refused policy fails here, before a whole run over the clip
    ref = _run(model, frames_dir, prompts, max_frames, reverse)
    runs = {}
    for batch in (False, True):
        handle = patch_sam(model, policy, batch_objects=batch)
        try:
            runs[batch] = _run(model, frames_dir, prompts, max_frames, reverse)
        finally:
            handle.restore()
    dense = all(r.pattern == "dense" for r in handle.report)
    given = min_iou is not None or max_logit_err is not None
    same_iou, same_err = (DENSE_HALF.mask_iou, DENSE_HALF.low_res_logits_err) if half else (1.0, 1e-3)  # same masks
    # a sparse policy is judged against SAM 2 by what the caller gave alone: a threshold not given is not checked
    bar_iou, bar_err = (same_iou, same_err) if dense else (0.0, float("inf"))
    report = VideoParityReport(
        policy=getattr(handle.policy, "name", str(policy)), objects=len({p["obj_id"] for p in prompts}),
        min_iou=bar_iou if min_iou is None else min_iou, max_logit_err=bar_err if max_logit_err is None else max_logit_err,
        batch_min_iou=same_iou, batch_max_logit_err=same_err, dense=dense, gated=dense or given,
        prompted=tuple(sorted({int(p["frame"]) for p in prompts})))
    for key in ref:
        iou, err = _compare(runs[True][key], ref[key])
        obj_iou, obj_err = _compare(runs[True][key], runs[False][key])
        report.frames.append(FrameParity(key[1], iou, err, obj_iou, obj_err, key[0]))
    return report
