"""What the mask pipeline computes (GeneratorSettings: the generators' own parameters) and how (Mode).

GeneratorSettings holds SamAutomaticMaskGenerator's parameters with segment-anything's names and
defaults, plus the three that only SAM2AutomaticMaskGenerator has (mask_threshold, use_m2m,
multimask_output); `GeneratorSettings.for_sam2()` gives SAM 2's defaults (predicted-IoU threshold 0.8).

A Mode says how the same settings are computed. Two are named:
  exact  every step as segment-anything's (or sam2's) generator does it, in its order, with its decoder
         batches; only work whose result is thrown away is skipped (masks below the predicted-IoU
         threshold are never upsampled; run-length encoding waits until NMS has picked the masks).
         The records are the reference generator's, equal value for value and in the same order.
  fast   the decoder on up to 1024 points per call, taken apart where it can be (decoder="auto":
         point_decoder.py, the same float32 math with the image-side work the points share done once and
         a fused upscaling kernel on CUDA), and on CUDA the upsampling fused with scoring, boxing and
         binarizing (upsample="auto": kernels.resize); every other step as exact. Its agreement with
         the reference is measured (docs/benchmarks.md, tests/test_maskgen.py), not guaranteed: on the
         H200 it found 99.54% of segment-anything's 1509 masks on the 20 sample photos at IoU >= 0.9,
         median best IoU 1.0, at 2.7x the images per second of the model's decoder on 1024 points (run
         48), which found all 1509. A stability prefilter on the low-res logits (low_res_margin=0.05,
         the fast mode's until run 41) lost 1.9% of them for no measurable time; it stays a Mode option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

STABILITY_ON = ("upsampled", "low_res")
DECODER_DTYPES = ("bfloat16", "float16")
DECODERS = ("model", "factored", "auto")
UPSAMPLES = ("model", "fused", "auto")


@dataclass(frozen=True)
class GeneratorSettings:
    """SamAutomaticMaskGenerator's parameters, with segment-anything's names and defaults; the last three
    are SAM2AutomaticMaskGenerator's (SAM 2 models only: SAM 1 binarizes at model.mask_threshold and has
    neither mask-to-mask refinement nor a single-mask grid)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    mask_threshold: float = 0.0
    use_m2m: bool = False
    multimask_output: bool = True

    def __post_init__(self):
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an integer >= 1")
        for name in ("crop_n_layers", "min_mask_region_area"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r}: expected an integer >= 0")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh",
                     "crop_overlap_ratio"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ValueError(f"{name}={v!r}: expected a number from 0 to 1")
        for name in ("stability_score_offset", "mask_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{name}={v!r}: expected a finite number (a logit offset or threshold)")
        for name in ("use_m2m", "multimask_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected True or False")

    @classmethod
    def for_sam2(cls, **changes) -> "GeneratorSettings":
        """SAM2AutomaticMaskGenerator's defaults (predicted-IoU threshold 0.8), with `changes` applied."""
        return cls(**{"pred_iou_thresh": 0.8, **changes})

    def sam2_only(self) -> list:
        """The SAM 2 parameters changed from their defaults (an error on a SAM 1 model)."""
        defaults = GeneratorSettings()
        return [n for n in ("mask_threshold", "use_m2m", "multimask_output") if getattr(self, n) != getattr(defaults, n)]


@dataclass(frozen=True)
class Mode:
    """How the pipeline computes the settings' masks.

    points_per_batch: points per decoder call; None: the settings' points_per_batch (what the reference
      generator uses). A larger batch gives other float rounding in the decoder's batched matmuls.
    stability_on: "upsampled" (the reference: every mask above the predicted-IoU threshold is upsampled to
      the image and scored there) or "low_res" (scored on the decoder's 256 x 256 logits, over the part
      that covers the image; only masks above both thresholds are upsampled; the scores differ by up
      to ~0.06 on the sample photos, so masks near the threshold change).
    low_res_margin: with stability_on="upsampled", drop a mask before upsampling when its low-res
      stability score is below the threshold minus this margin (None: no prefilter). A mask the
      reference keeps is lost only where the two scores differ by more than the margin.
    decoder_dtype: None (the model's own dtype) or "bfloat16" / "float16": the prompt encoder and mask
      decoder under torch.autocast on CUDA; logits and scores come back as float32.
    compile_decoder: None, or a torch.compile mode ("default", "reduce-overhead" for CUDA graphs,
      "max-autotune-no-cudagraphs"): the decoder call compiled for one batch shape (the last batch of a
      crop is padded to it). The first call compiles (tens of seconds).
    decoder: "model" (the model's own mask decoder), "factored" (point_decoder.decode_points: the same
      float32 math with the work the points share done once, the upscaling fused on CUDA; logits differ
      by float32 rounding; an error for a decoder of another layout or with sparse attention; calls with
      a mask prompt, as SAM 2's mask-to-mask refinement, and calls while a handle observes the decoder
      keep the model's) or "auto" (factored where it can be, else the model's, without an error). Not
      "factored" or "auto" with compile_decoder.
    upsample: "model" (the model's own postprocessing: each mask's logits resized to the image, held in
      memory-bounded chunks, then scored, boxed and binarized), "fused" (kernels.resize: the resize and
      the stability counts, boxes and final binarization in one kernel on CUDA, no resized logits held;
      the kernel's float32 rounding may move a pixel within rounding of a threshold; an error for a model
      whose postprocessing is not plain bilinear resizing: SAM 2 with min_mask_region_area > 0) or "auto"
      ("fused" on CUDA where it can be, else the model's).
    """

    name: str
    points_per_batch: Optional[int] = None
    stability_on: str = "upsampled"
    low_res_margin: Optional[float] = None
    decoder_dtype: Optional[str] = None
    compile_decoder: Optional[str] = None
    decoder: str = "model"
    upsample: str = "model"

    def __post_init__(self):
        if self.points_per_batch is not None and (not isinstance(self.points_per_batch, int) or self.points_per_batch < 1):
            raise ValueError(f"points_per_batch={self.points_per_batch!r}: expected None or an integer >= 1")
        if self.stability_on not in STABILITY_ON:
            raise ValueError(f"stability_on={self.stability_on!r}: expected one of {', '.join(STABILITY_ON)}")
        if self.low_res_margin is not None:
            if self.stability_on != "upsampled":
                raise ValueError("low_res_margin: a prefilter for stability_on='upsampled' only")
            if not isinstance(self.low_res_margin, (int, float)) or not 0 <= self.low_res_margin <= 1:
                raise ValueError(f"low_res_margin={self.low_res_margin!r}: expected None or a number from 0 to 1")
        if self.decoder_dtype is not None and self.decoder_dtype not in DECODER_DTYPES:
            raise ValueError(f"decoder_dtype={self.decoder_dtype!r}: expected None or one of {', '.join(DECODER_DTYPES)}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder={self.decoder!r}: expected one of {', '.join(DECODERS)}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"upsample={self.upsample!r}: expected one of {', '.join(UPSAMPLES)}")
        if self.decoder != "model" and self.compile_decoder is not None:
            raise ValueError(f"decoder={self.decoder!r} runs its own fused kernel: compile_decoder needs decoder='model'")


EXACT = Mode("exact")
FAST = Mode("fast", points_per_batch=1024, decoder="auto", upsample="auto")
MODES = {"exact": EXACT, "fast": FAST}


def resolve_mode(mode: Union[str, Mode]) -> Mode:
    """A Mode from its name ("exact", "fast") or a Mode itself (e.g. dataclasses.replace(FAST, ...))."""
    if isinstance(mode, Mode):
        return mode
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)} (or a Mode)")
    return MODES[mode]


def with_changes(mode: Union[str, Mode], **changes) -> Mode:
    """`mode` with some fields changed and a name that says so ("fast+compile_decoder=default")."""
    base = resolve_mode(mode)
    label = ",".join(f"{k}={v}" for k, v in changes.items())
    return dataclasses.replace(base, name=f"{base.name}+{label}" if label else base.name, **changes)
