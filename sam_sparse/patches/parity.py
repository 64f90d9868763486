"""verify_parity: run a model unpatched and patched on the same inputs and compare everything.

    report = verify_parity(sam, "dense", [image], points=[[320, 240]])
    print(report); assert report.passed

Per image, the model runs unpatched, then patched (patch_sam's class swap is applied and undone around
each patched run, so both runs use the same parameters), with forward hooks on every patched module.
Both families: a segment-anything Sam runs through SamPredictor, a SAM 2 model through
SAM2ImagePredictor. Compared:
- each patched layer's output: max abs error and cosine (over the flattened output, worst call);
  layer inputs differ too, since earlier layers were patched: these errors include propagation;
- the image embedding (cosine, max abs error); for SAM 2, the worst of the image embedding and the two
  high-resolution feature maps its decoder also reads;
- per prompt: IoU of the binarized masks at the image's original size, for the mask the unpatched
  model scores best among its multimask outputs (the one a user would take), and the max abs errors
  of all 256x256 low-res logits and of all IoU predictions.

Thresholds (ParityThresholds; pass your own to gate differently). A dense policy must reproduce the
model up to rounding; a sparse policy is an approximation, so its defaults only catch breakage:

| preset              | layer cosine | embedding cosine | mask IoU | low-res logits err | IoU-pred err |
|---------------------|--------------|------------------|----------|--------------------|--------------|
| DENSE_FP32          | >= 0.99999   | >= 0.99999       | >= 0.99  | <= 0.01            | <= 0.001     |
| DENSE_HALF (fp16/bf16) | >= 0.999  | >= 0.999         | >= 0.90  | <= 2.0             | <= 0.05      |
| SPARSE              | >= 0.5       | >= 0.95          | >= 0.80  | not checked        | <= 0.1       |

Half-precision thresholds are loose because SAM's own bf16 math rounds the N x N logits and
probabilities to bf16 (the patched kernel keeps them in fp32), so the unpatched reference itself is
off by that much; binarized masks flip where a logit is near 0.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything.modeling import ImageEncoderViT, Sam
from torch import nn

from ..images import check_rgb_images
from ..sam2_layers import IMAGE_SIZE as SAM2_IMAGE_SIZE
from ..table import format_table
from .families import family_for
from .patcher import patch_sam

_INF = float("inf")


@dataclass(frozen=True)
class ParityThresholds:
    """Pass/fail limits. Cosines and IoU are minimums; errors are maximums (inf: not checked).

    layer_cosine: each patched layer's output, worst call. embedding_cosine: image embeddings, worst image.
    mask_iou: binarized masks at original image size, worst prompt (its best-scored mask, unpatched).
    low_res_logits_err: max |patched - unpatched| of the 256x256 logits, in logit units.
    iou_pred_err: max |patched - unpatched| of the predicted IoU scores (0..1).
    mask_iou_median, mask_iou_p5: the median and the 5th percentile (linear interpolation) of the
        mask IoUs over every prompt: a quality bar that tolerates a rare bad mask, which a worst-prompt
        limit cannot (0: not checked).
    """

    layer_cosine: float
    embedding_cosine: float
    mask_iou: float
    low_res_logits_err: float
    iou_pred_err: float
    name: str = "custom"
    mask_iou_median: float = 0.0
    mask_iou_p5: float = 0.0


DENSE_FP32 = ParityThresholds(0.99999, 0.99999, 0.99, 0.01, 0.001, "DENSE_FP32")
DENSE_HALF = ParityThresholds(0.999, 0.999, 0.90, 2.0, 0.05, "DENSE_HALF")
# A quality bar, set from docs/quality.md (MobileSAM's real decoder over 17 photos, 1716 masks): the
# dense decoder measures median 1.0 / p5 1.0 / IoU-prediction error 0.0000, the hand-made
# region_focused median 0.996 but p5 0.65, with a tail of wrong masks users would see. The worst-prompt
# floor is a breakage detector (a wrong permutation gives IoUs near 0).
SPARSE = ParityThresholds(0.5, 0.95, 0.50, _INF, 0.1, "SPARSE", mask_iou_median=0.95, mask_iou_p5=0.85)


@dataclass
class LayerParity:
    """One patched module: worst max abs error and cosine of its output over `calls` calls."""

    name: str
    kind: str
    pattern: str
    max_abs_err: float = 0.0
    cosine: float = 1.0
    calls: int = 0


@dataclass
class ParityReport:
    """What verify_parity measured; ``passed`` is True when every number is within ``thresholds``."""

    policy: str
    dtype: str
    thresholds: ParityThresholds
    layers: List[LayerParity] = field(default_factory=list)
    embedding_cosine: List[float] = field(default_factory=list)  # one per image
    embedding_max_err: List[float] = field(default_factory=list)
    mask_iou: List[Tuple[str, float]] = field(default_factory=list)  # (prompt label, IoU)
    low_res_logits_err: float = 0.0
    iou_pred_err: float = 0.0
    notes: List[str] = field(default_factory=list)
    image_names: List[str] = field(default_factory=list)

    @property
    def failures(self) -> List[str]:
        t, out = self.thresholds, []
        if not (self.embedding_cosine or self.mask_iou or any(lp.calls for lp in self.layers)):
            out.append("nothing was compared: no image embedded, no prompt decoded, no patched layer called")
        sparse = [lp for lp in self.layers if lp.pattern != "dense"]
        if sparse and not any(lp.calls for lp in sparse):
            kinds = sorted({lp.kind for lp in sparse})
            hint = ("; SAM 2's memory attention runs in video only: check the policy with sam_sparse.video_parity "
                    "(README: SAM 2 video)") if any(k.startswith("memory") for k in kinds) else ""
            out.append(f"no layer the policy makes sparse ran ({len(sparse)} of kind {', '.join(kinds)}): nothing "
                       f"sparse was compared{hint}")
        for lp in self.layers:
            if lp.calls and not lp.cosine >= t.layer_cosine:
                out.append(f"{lp.name}: output cosine {lp.cosine:.6f} < {t.layer_cosine}")
        for i, c in enumerate(self.embedding_cosine):
            if not c >= t.embedding_cosine:
                name = self.image_names[i] if i < len(self.image_names) else f"image {i}"
                out.append(f"{name}: embedding cosine {c:.6f} < {t.embedding_cosine}")
        for label, iou in self.mask_iou:
            if not iou >= t.mask_iou:
                out.append(f"{label}: mask IoU {iou:.4f} < {t.mask_iou}")
        if self.mask_iou:
            median, p5 = self.mask_iou_stats
            if not median >= t.mask_iou_median:
                out.append(f"median mask IoU {median:.4f} < {t.mask_iou_median} (over {len(self.mask_iou)} prompts)")
            if not p5 >= t.mask_iou_p5:
                out.append(f"5th-percentile mask IoU {p5:.4f} < {t.mask_iou_p5} (over {len(self.mask_iou)} prompts)")
        if self.mask_iou and not self.low_res_logits_err <= t.low_res_logits_err:
            out.append(f"low-res logits max error {self.low_res_logits_err:.4g} > {t.low_res_logits_err}")
        if self.mask_iou and not self.iou_pred_err <= t.iou_pred_err:
            out.append(f"IoU-prediction max error {self.iou_pred_err:.4g} > {t.iou_pred_err}")
        return out

    @property
    def mask_iou_stats(self) -> Tuple[float, float]:
        """(median, 5th percentile) of the mask IoUs; (nan, nan) without prompts."""
        if not self.mask_iou:
            return math.nan, math.nan
        ious = np.array([v for _, v in self.mask_iou], dtype=np.float64)
        return float(np.median(ious)), float(np.percentile(ious, 5))

    @property
    def passed(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        t = self.thresholds
        lines = [f"sam-sparse parity: policy {self.policy!r}, {self.dtype}, thresholds {t.name}: "
                 f"{'PASS' if self.passed else 'FAIL'}"]
        lines += [f"note: {n}" for n in self.notes]
        rows = [("layer", "kind", "pattern", "max abs err", "cosine", "calls")]
        for lp in self.layers:
            # a layer this comparison never runs (SAM 2's memory attention in an image comparison) is not a pass
            err, cos = (f"{lp.max_abs_err:.3g}", f"{lp.cosine:.6f}") if lp.calls else ("-", "not run")
            rows.append((lp.name, lp.kind, lp.pattern, err, cos, str(lp.calls)))
        lines.append(format_table(rows[0], rows[1:]))
        summary = [("image embedding cosine (min)", _min(self.embedding_cosine), _limit(">=", t.embedding_cosine)),
                   ("image embedding max abs err", max(self.embedding_max_err, default=0.0), "")]
        if self.mask_iou:
            ious = [v for _, v in self.mask_iou]
            median, p5 = self.mask_iou_stats
            summary += [("mask IoU (min over prompts)", min(ious), _limit(">=", t.mask_iou)),
                        ("mask IoU (median)", median, _limit(">=", t.mask_iou_median, 0.0)),
                        ("mask IoU (5th percentile)", p5, _limit(">=", t.mask_iou_p5, 0.0)),
                        ("mask IoU (mean)", sum(ious) / len(ious), ""),
                        ("low-res logits max abs err", self.low_res_logits_err, _limit("<=", t.low_res_logits_err)),
                        ("IoU-prediction max abs err", self.iou_pred_err, _limit("<=", t.iou_pred_err))]
        lines.append("")
        lines += [f"{k:30s} {v:.6g} {lim}".rstrip() for k, v, lim in summary]
        fails = self.failures
        if fails:
            lines.append("failures:")
            lines += [f"  {f}" for f in fails[:20]] + ([f"  ... {len(fails) - 20} more"] if len(fails) > 20 else [])
        return "\n".join(lines)


def preset_for(handle, dtype: torch.dtype, choice: str = "auto") -> ParityThresholds:
    """The preset verify_parity uses: "auto" = DENSE_FP32 / DENSE_HALF (by dtype) when every layer the
    handle patched is dense, else SPARSE; "dense" / "sparse" force one."""
    if choice == "auto":
        choice = "dense" if all(r.pattern == "dense" for r in handle.report) else "sparse"
    if choice == "dense":
        return DENSE_FP32 if dtype == torch.float32 else DENSE_HALF
    return SPARSE


def _limit(op: str, value: float, unchecked: float = _INF) -> str:
    """'<= 0.1', or '(not checked)' for a limit that cannot fail (inf, or `unchecked`)."""
    return "(not checked)" if math.isinf(value) or value == unchecked else f"{op} {value}"


def _min(xs: Sequence[float]) -> float:
    return min(xs) if xs else float("nan")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    return float((a @ b) / (na * nb).clamp_min(1e-300))


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else inter / union


def _as_images(images) -> List[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return [images]
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
        return [images] if images.ndim == 3 else list(images)
    return [np.asarray(im) for im in images]


def _per_image(prompts, n_images: int, width: int, what: str) -> List[Optional[np.ndarray]]:
    """None; one (K, width) array-like for every image; or a list of one 2-D array (or None) per image."""
    if prompts is None:
        return [None] * n_images
    if isinstance(prompts, (list, tuple)) and all(p is None or np.ndim(p) == 2 for p in prompts):
        if len(prompts) != n_images:
            raise ValueError(f"{what}: a list of {len(prompts)} per-image arrays for {n_images} images")
        return [None if p is None else np.asarray(p, dtype=np.float32).reshape(-1, width) for p in prompts]
    arr = np.asarray(prompts, dtype=np.float32)
    if arr.size == 0 or arr.shape[-1] != width or arr.ndim > 2:
        raise ValueError(f"{what}: expected a (K, {width}) array for all images or a list of one per image, got shape {arr.shape}")
    return [arr.reshape(-1, width)] * n_images


class _Recorder:
    """Forward hooks on the patched modules: record unpatched outputs, then compare patched ones."""

    def __init__(self, handle):
        self.stats: Dict[str, LayerParity] = {}
        self.saved: Dict[str, List[torch.Tensor]] = {}
        self.mode = "off"
        self.hooks = []
        for rep, module in handle.modules():
            self.stats[rep.name] = LayerParity(rep.name, rep.kind, rep.pattern)
            self.hooks.append(module.register_forward_hook(self._hook(rep.name)))

    def _hook(self, name):
        def hook(_, __, out):
            if self.mode == "record":
                self.saved.setdefault(name, []).append(out.detach())
            elif self.mode == "compare":
                ref = self.saved[name].pop(0)
                lp = self.stats[name]
                if lp.kind in ("encoder.window", "encoder.pooled") and ref.shape != out.shape:
                    # Unpatched, the partitioned windows (B * nW, w, w, C); patched, the whole grid
                    # (B, H, W, C), read window by window in place (SparseWindowBlock, SparseMultiScaleBlock).
                    ref = _unpartition(ref, out.shape[1:3])
                lp.max_abs_err = max(lp.max_abs_err, float((out.detach().float() - ref.float()).abs().max()))
                lp.cosine = min(lp.cosine, _cosine(out.detach(), ref))
                lp.calls += 1

        return hook

    def remove(self):
        for h in self.hooks:
            h.remove()
        self.saved.clear()


def _unpartition(windows: torch.Tensor, grid) -> torch.Tensor:
    """(B * nW, w, w, C) windows in raster order -> (B, H, W, C), the padding past the grid cropped."""
    w = windows.shape[1]
    nr, nc = -(-grid[0] // w), -(-grid[1] // w)
    x = windows.view(-1, nr, nc, w, w, windows.shape[-1]).transpose(2, 3).reshape(-1, nr * w, nc * w, windows.shape[-1])
    return x[:, : grid[0], : grid[1]]


def verify_parity(
    model: nn.Module,
    policy,
    images,
    points=None,
    boxes=None,
    *,
    thresholds: Optional[ParityThresholds] = None,
    multimask_output: bool = True,
    filter_fn=None,
    image_names: Optional[Sequence[str]] = None,
) -> ParityReport:
    """Compare `model` patched with `policy` against the same model unpatched.

    model: a segment_anything Sam or a sam2 SAM2Base (or its SAM2ImagePredictor / generator: its model)
        for the full pipeline (embeddings, masks), or an image encoder alone (embeddings and layers only):
        segment_anything's ImageEncoderViT, sam2's ImageEncoder or its Hiera trunk (an image's embedding
        cosine takes all of its features: the FPN levels, the vision features among them, or Hiera's stages).
        Its patch state is left as found: an unpatched model stays unpatched, a model patched by
        patch_sam is unpatched for the comparison and re-patched after.
    images: for a full model, one HxWx3 uint8 RGB array or a list of them (as the predictor's
        set_image); for an image encoder, a (B, 3, S, S) float tensor already preprocessed.
    points: (P, 2) pixel coords (x, y) in the original image, each one a separate foreground-point
        prompt; the same for every image, or a list with one array per image. boxes: (K, 4) XYXY
        pixels, each box a prompt, likewise. Both None: one point at the image centre.
    thresholds: ParityThresholds; default DENSE_FP32 / DENSE_HALF (by the dtype the model computes in: its
        weights', or autocast's around a float32 model) when every patched layer is dense, SPARSE otherwise.
        A SAM 2 model runs half precision under autocast only (a half-precision SAM2Base is refused).
    image_names: one name per image, for the report's lines (default "image 0", "image 1", ...).
    Returns a ParityReport (str(report) is a table; report.passed).
    """
    if not isinstance(images, (np.ndarray, torch.Tensor)):
        images = list(images)
    given = (1 if images.ndim == 3 else images.shape[0]) if isinstance(images, (np.ndarray, torch.Tensor)) else len(images)
    if given == 0:
        raise ValueError("images: none given; expected an HxWx3 uint8 image or a list of them (a (B, 3, S, S) "
                         "tensor for an image encoder)")
    sam2 = _sam2_model(model)
    if sam2 is not None:
        model = sam2
    elif not isinstance(model, (Sam, ImageEncoderViT)):
        raise TypeError(f"verify_parity supports segment_anything's Sam or ImageEncoderViT, or sam2's SAM2Base, "
                        f"ImageEncoder or Hiera; got {type(model).__name__}")
    encoder_only = isinstance(model, ImageEncoderViT) or (sam2 is not None and _sam2_encoder(sam2))
    if thresholds is not None and not isinstance(thresholds, ParityThresholds):
        raise TypeError(f"thresholds={thresholds!r}: expected a ParityThresholds (DENSE_FP32, DENSE_HALF, SPARSE or "
                        "your own) or None")
    if sam2 is not None and not encoder_only and next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"{type(model).__name__} has {next(model.parameters()).dtype} weights; SAM 2's predictor "
                         "needs float32 ones (it runs half precision through autocast, as its README does): call "
                         "verify_parity on the float32 model inside torch.autocast(device, dtype=torch.bfloat16)")
    if not encoder_only:  # a full model takes what set_image takes: checked before any work
        ims = check_rgb_images(_as_images(images))
        for what, width, given in (("points", 2, points), ("boxes", 4, boxes)):
            for i, (im, arr) in enumerate(zip(ims, _per_image(given, len(ims), width, what))):
                xy = None if arr is None else arr.reshape(-1, 2)
                h, w = im.shape[:2]
                if xy is not None and not (np.isfinite(xy).all() and (xy >= 0).all() and (xy[:, 0] <= w).all()
                                           and (xy[:, 1] <= h).all()):
                    raise ValueError(f"{what} of image {i}: {arr.tolist()[:4]} has a coordinate that is not a number "
                                     f"or lies outside the {w}x{h} image (pixels, x right, y down)")
    prior = getattr(model, "_sam_sparse_handle", None)
    if prior is not None:
        prior.restore()
    handle = recorder = None
    try:
        handle = patch_sam(model, policy, filter_fn=filter_fn)
        handle.restore()
        weight = next(model.parameters())
        dtype = compute = weight.dtype
        if dtype == torch.float32 and torch.is_autocast_enabled(weight.device.type):  # SAM 2's README runs so
            compute = torch.get_autocast_dtype(weight.device.type)
        if thresholds is None:
            thresholds = preset_for(handle, compute)
        computes = str(compute).replace("torch.", "") + (" (autocast)" if compute != dtype else "")
        report = ParityReport(policy=getattr(handle.policy, "name", str(policy)), dtype=computes,
                              thresholds=thresholds, notes=list(handle.notes), image_names=list(image_names or []))
        recorder = _Recorder(handle)

        def both(fn):
            """fn() unpatched (recording layer outputs), then patched (comparing): (unpatched, patched)."""
            recorder.mode = "record"
            ref = fn()
            handle.enable()
            try:
                recorder.mode = "compare"
                out = fn()
            finally:
                handle.restore()
                recorder.mode = "off"
                recorder.saved.clear()
            return ref, out

        if encoder_only:
            if points is not None or boxes is not None:
                raise ValueError(f"points/boxes need a whole model; an image encoder ({type(model).__name__}) is "
                                 "compared on embeddings only")
            x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.stack(images))
            x = x.to(device=next(model.parameters()).device, dtype=dtype)
            if (sam2 is not None and x.shape[-1] != SAM2_IMAGE_SIZE
                    and any(r.pattern != "dense" or r.key_tile is not None
                            for r in handle.report if r.kind.startswith("encoder."))):
                # its block masks or token tiles were built for a grid the input does not have (the patched
                # forwards would refuse it after the unpatched pass): say so before any work
                raise ValueError(f"{type(model).__name__} alone is patched for SAM 2's {SAM2_IMAGE_SIZE} px input "
                                 f"(its block masks and token tiles are built for that grid); got {x.shape[-1]} px: "
                                 "compare the whole SAM2Base, whose image_size sets the grid, or use a dense policy "
                                 "in raster token order")
            with torch.no_grad():
                ref, out = (_output_tensors(y) for y in both(lambda: model(x)))
            for i in range(x.shape[0]):  # one image: every output tensor's slice of it, as one vector
                r = torch.cat([t[i].float().flatten() for t in ref])
                o = torch.cat([t[i].float().flatten() for t in out])
                report.embedding_cosine.append(_cosine(o, r))
                report.embedding_max_err.append(float((o - r).abs().max()))
        else:
            run = _Sam2Run(model) if sam2 is not None else _SamRun(model)
            _predictor_parity(run, model, handle, images, points, boxes, multimask_output, both, report, image_names)
        report.layers = list(recorder.stats.values())
        return report
    finally:
        if recorder is not None:
            recorder.remove()
        if handle is not None:
            handle.restore()
        if prior is not None:
            prior.enable()


def _sam2_model(obj):
    """The SAM2Base to compare when obj is a SAM 2 model, predictor or generator; else None."""
    try:
        fam = family_for(obj)
    except TypeError:
        return None
    if fam.NAME != "sam2":
        return None
    model = fam.unwrap(obj)[0]
    from sam2.modeling.sam2_base import SAM2Base

    if not isinstance(model, SAM2Base) and not _sam2_encoder(model):
        raise TypeError(f"verify_parity supports sam2's SAM2Base (or its predictor), ImageEncoder or Hiera; "
                        f"got {type(model).__name__}")
    return model


def _sam2_encoder(model) -> bool:
    """Whether model is sam2's image encoder alone: its ImageEncoder (trunk and neck) or the Hiera trunk."""
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import ImageEncoder

    return isinstance(model, (ImageEncoder, Hiera))


def _output_tensors(out) -> List[torch.Tensor]:
    """The tensors of an encoder's output that depend on the image: a tensor, a list of them (Hiera's stages),
    or sam2's ImageEncoder dict's FPN levels (its vision features are the last one; its positional encodings
    depend on the grid alone, and would only dilute a cosine)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out["backbone_fpn"])
    return [t for item in out for t in _output_tensors(item)]


class _SamRun:
    """segment-anything's side of _predictor_parity: SamPredictor, one feature map."""

    def __init__(self, model: Sam):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(model)
        self.device, self.dtype = model.device, next(model.parameters()).dtype
        self.threshold = model.mask_threshold

    def embed(self, image):
        self.predictor.set_image(image)
        return (self.predictor.features,)

    def points(self, pts):
        p = self.predictor
        coords = torch.as_tensor(p.transform.apply_coords(pts, p.original_size), dtype=torch.float, device=self.device)
        return dict(point_coords=coords[:, None, :], point_labels=torch.ones(len(pts), 1, dtype=torch.int, device=self.device))

    def boxes(self, bxs):
        p = self.predictor
        return dict(point_coords=None, point_labels=None, boxes=torch.as_tensor(
            p.transform.apply_boxes(bxs, p.original_size), dtype=torch.float, device=self.device))

    def decode(self, feats, kw, multimask_output):
        self.predictor.features = feats[0]
        # segment-anything's PromptEncoder multiplies fp32 coords by its weights: autocast lets a
        # half-precision model through (patched or not).
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.predictor.predict_torch(**kw, multimask_output=multimask_output, return_logits=True)

    def reset(self):
        self.predictor.reset_image()


class _Sam2Run:
    """SAM 2's side of _predictor_parity: SAM2ImagePredictor (its batched prompt path), and every feature
    map its decoder reads (the image embedding and two high-resolution maps)."""

    def __init__(self, model):
        from .sam2 import image_predictor

        self.predictor = image_predictor(model)
        self.threshold = self.predictor.mask_threshold

    def embed(self, image):
        self.predictor.set_image(image)
        f = self.predictor._features
        return (f["image_embed"], *f["high_res_feats"])

    def points(self, pts):
        _, coords, labels, _ = self.predictor._prep_prompts(pts[:, None, :], np.ones((len(pts), 1), np.int64), None,
                                                            None, True)
        return dict(point_coords=coords, point_labels=labels)

    def boxes(self, bxs):
        return dict(point_coords=None, point_labels=None, boxes=self.predictor._prep_prompts(None, None, bxs, None, True)[3])

    def decode(self, feats, kw, multimask_output):
        self.predictor._features = {"image_embed": feats[0], "high_res_feats": list(feats[1:])}
        return self.predictor._predict(**kw, multimask_output=multimask_output, return_logits=True)

    def reset(self):
        self.predictor.reset_predictor()


def _predictor_parity(run, model, handle, images, points, boxes, multimask_output: bool, both, report: ParityReport,
                      image_names: Optional[Sequence[str]] = None) -> None:
    """Embeddings and masks, unpatched vs patched, through `run` (_SamRun / _Sam2Run): per image, the feature
    maps (worst cosine and max error over them), then each point or box prompt decoded from each side's
    own features, as a patched end-to-end run would."""
    encoder_modules = set(model.image_encoder.modules())
    encoder_patched = any(module in encoder_modules for _, module in handle.modules())
    images = _as_images(images)
    all_points = _per_image(points, len(images), 2, "points")
    all_boxes = _per_image(boxes, len(images), 4, "boxes")
    for i, image in enumerate(images):
        name = image_names[i] if image_names is not None and i < len(image_names) else f"image {i}"
        centre = all_points[i] is None and all_boxes[i] is None
        if centre:
            h, w = image.shape[:2]
            all_points[i] = np.array([[w / 2, h / 2]], dtype=np.float32)
        with torch.no_grad():
            if encoder_patched:
                ref_feats, feats = both(lambda: run.embed(image))
            else:  # nothing patched in the encoder (e.g. MobileSAM): the same code, so run it once
                ref_feats = feats = run.embed(image)
        report.embedding_cosine.append(min(_cosine(o, r) for o, r in zip(feats, ref_feats)))
        report.embedding_max_err.append(max(float((o.float() - r.float()).abs().max()) for o, r in zip(feats, ref_feats)))

        prompt_sets = []
        if all_points[i] is not None:
            pts = np.asarray(all_points[i], dtype=np.float32).reshape(-1, 2)
            prompt_sets.append(([f"point {x:g},{y:g}" + (" (the image centre)" if centre else "") for x, y in pts],
                                run.points(pts)))
        if all_boxes[i] is not None:
            bxs = np.asarray(all_boxes[i], dtype=np.float32).reshape(-1, 4)
            prompt_sets.append(([f"box {','.join(f'{v:g}' for v in b)}" for b in bxs], run.boxes(bxs)))
        for labels_text, kw in prompt_sets:
            sides = iter((ref_feats, feats))
            with torch.no_grad():
                (ref_m, ref_iou, ref_lr), (m, iou, lr) = both(lambda: run.decode(next(sides), kw, multimask_output))
            thr = run.threshold
            chosen = ref_iou.argmax(dim=1)  # the mask a user of the unpatched model would take
            for p in range(m.shape[0]):
                j = int(chosen[p])
                report.mask_iou.append((f"{name}, {labels_text[p]}", _iou(m[p, j] > thr, ref_m[p, j] > thr)))
            report.low_res_logits_err = max(report.low_res_logits_err, float((lr.float() - ref_lr.float()).abs().max()))
            report.iou_pred_err = max(report.iou_pred_err, float((iou.float() - ref_iou.float()).abs().max()))
        run.reset()
