"""Automatic mask generation on the model's device: SamAutomaticMaskGenerator's (and, for SAM 2 models,
SAM2AutomaticMaskGenerator's) records, with the work done where the data is.

    generator = AutomaticMaskGenerator(model, "fast", points_per_side=32)   # a Sam, MobileSAM or SAM2Base
    records = generator.generate(image)                                     # HxWx3 uint8 RGB
    for result in generator.generate_many(paths, load=load_image):          # decoding / resizing ahead
        ...

Per image (and per crop of each crop layer): the encoder; the decoder on the point grid in batches,
queued back to back and filtered in groups (the filters' waits for the device once per group); the
predicted-IoU filter on the decoder's low-resolution logits (upsampling is per mask, so the masks it
drops never need upsampling); the stability score on the upsampled logits (a Mode's low_res_margin may
first drop the masks whose low-res score is far below the threshold) and its filter; for the masks left, the upsampled,
binarized masks in memory-bounded chunks, only for their boxes and the crop-edge filter; box NMS
(torchvision's batched_nms) per crop, then between crops. Only the masks NMS keeps are upsampled again
(bit for bit as before) and kept at full size; their run-length boundaries, areas, boxes and scores come
to the host in one copy (transfer.to_host), where the records are built. With Mode(upsample="fused")
the upsampling, scoring, boxing and binarizing are one kernel (kernels.resize) that never writes the
upsampled logits.

Every step in exact mode computes what the reference computes, on the same tensors, in the same order:
the records are equal value for value, type for type (segment-anything turns a crop's boxes into
floats when one of its decoder batches keeps no mask; so does this) and in the same order. The
reference runs `min_mask_region_area` through segment-anything's own postprocess_small_regions (SAM 1;
host-side, needs OpenCV) or the SAM 2 predictor's hole filling (in Sam2Adapter.upsample).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    area_from_rle,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
)
from torchvision.ops.boxes import batched_nms, box_area

from ..kernels import resized_masks, resized_stats
from ..patches import dense_attention
from .adapters import Embedding, Prepared, adapter_for, model_family
from .point_decoder import check_factorable
from .prefetch import prefetch
from .rle import rle_counts, rle_runs, rle_to_mask
from .settings import GeneratorSettings, Mode, resolve_mode
from .timing import Stopwatch
from .transfer import to_host

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
# Decoder memory per point of a batch (SAM's mask decoder in float32: the image embedding repeated per
# point, the two-way transformer's activations, the 256 x 256 upscaling): caps the fast mode's batch.
DECODER_BYTES_PER_POINT = 48 << 20
CPU_DECODER_BATCH = 64  # fast mode on the CPU: larger batches cost memory and gain nothing there
UPSAMPLE_BYTES = 1 << 31  # float32 logits held at once while upsampling (chunks of masks)
FILTER_BYTES = 1 << 30  # low-res logits of the decoder batches filtered together (a filter's waits per group)


@dataclass
class PreparedImage:
    """An image ready for the device: its size (H, W) and per crop (xyxy box, crop layer, Prepared or
    None when a precomputed embedding stands in for it)."""

    size: Tuple[int, int]
    crops: List[Tuple[List[int], int, Optional[Prepared]]]


@dataclass
class CropMasks:
    """The masks one crop keeps after its NMS: low-res logits (k, h, w) (upsampled again for the final
    masks), boxes (k, 4) in the image's frame, predicted IoU and stability (k,), the index of each one's
    point, the crop's box, embedding and points (n, 2) in the image's frame and the records' dtype."""

    low_res: torch.Tensor
    boxes: torch.Tensor
    iou: torch.Tensor
    stability: torch.Tensor
    point_index: torch.Tensor
    box: List[int]
    embedding: Embedding
    points: np.ndarray


@dataclass
class Result:
    """generate_many's answer for one item: the records, or the error that reading / preparing it raised;
    `seconds` per stage when the generator profiles."""

    item: Any
    records: Optional[List[dict]] = None
    error: Optional[BaseException] = None
    seconds: Optional[dict] = None


class AutomaticMaskGenerator:
    """The records of SamAutomaticMaskGenerator (SAM2AutomaticMaskGenerator for a SAM 2 model).

    model: a segment-anything Sam (MobileSAM too), a sam2 SAM2Base, or a predictor of one.
    mode: "exact" (the reference's records), "fast" or a Mode (settings.py).
    settings: a GeneratorSettings; default the family's defaults (GeneratorSettings() for SAM 1,
      GeneratorSettings.for_sam2() for SAM 2); keyword arguments change single fields.
    output_mode: "binary_mask" (HxW bool arrays), "uncompressed_rle" or "coco_rle", as the reference.
    profile: measure seconds per stage (waits for the device at each stage; see `last_seconds`).
    fused_upsample (attribute): whether kernels.resize does the upsampling (the Mode's `upsample`).
    """

    def __init__(self, model, mode: Union[str, Mode] = "exact", settings: Optional[GeneratorSettings] = None,
                 output_mode: str = "binary_mask", profile: bool = False, **changes):
        family = model_family(model)
        if settings is None:
            settings = GeneratorSettings.for_sam2(**changes) if family == "sam2" else GeneratorSettings(**changes)
        elif changes:
            settings = dataclasses.replace(settings, **changes)
        if family == "sam" and settings.sam2_only():
            raise ValueError(f"{', '.join(settings.sam2_only())}: SAM 2 generator parameters; a SAM 1 model "
                             "binarizes at model.mask_threshold, with three masks per point and no refinement")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode={output_mode!r}: expected one of {', '.join(OUTPUT_MODES)}")
        if output_mode == "coco_rle":
            import pycocotools  # noqa: F401  (as the reference: fail now, not after the first image)
        self.small_regions = family == "sam" and settings.min_mask_region_area > 0
        if self.small_regions:
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise ValueError("min_mask_region_area > 0 needs OpenCV (pip install opencv-python), as "
                                 "segment-anything's generator does") from None
        self.settings = settings
        self.mode = resolve_mode(mode)
        self.output_mode = output_mode
        self.adapter = adapter_for(model, settings.min_mask_region_area)
        self.device = torch.device(self.adapter.device)
        self.threshold = self.adapter.mask_threshold(settings)
        self.point_grids = build_all_layer_point_grids(settings.points_per_side, settings.crop_n_layers,
                                                       settings.crop_n_points_downscale_factor)
        self.stopwatch = Stopwatch(profile, self.device)
        self.last_seconds: Optional[dict] = None
        self._decode_fn = self.adapter.decode
        self._factorable = self.mode.decoder != "model" and self._check_factorable(self.mode.decoder == "factored")
        self.fused_upsample = self._check_fused_upsample()
        if self.mode.compile_decoder is not None:
            self._decode_fn = torch.compile(self.adapter.decode, mode=self.mode.compile_decoder, dynamic=False)
        self._max_batch: Optional[int] = None

    # ---------------------------------------------------------------------------------------------
    # Public entry points
    # ---------------------------------------------------------------------------------------------

    def generate(self, image: np.ndarray, embedding: Optional[Embedding] = None,
                 prepared: Optional[PreparedImage] = None) -> List[dict]:
        """The records for one HxWx3 uint8 RGB image. embedding: the image's encoder output (from
        embed_images), used instead of running the encoder on the whole image (crops still embed).
        prepared: prepare(image)'s result, made ahead (generate_many's worker thread does)."""
        check_image(image)
        with torch.inference_mode():
            self.stopwatch.start()
            if prepared is None:
                prepared = self.prepare(image, skip_whole=embedding is not None)
                self.stopwatch.lap("prepare")
            records = self.run(prepared, embedding)
        self.last_seconds = self.stopwatch.take() if self.stopwatch.enabled else None
        return records

    def generate_many(self, items: Iterable, load: Optional[Callable[[Any], np.ndarray]] = None,
                      depth: int = 2) -> Iterator[Result]:
        """Result(item, records) for each item, in order. Items are images, or whatever `load` turns into
        one (e.g. paths with segment.load_image); loading and host-side resizing run on a worker thread
        up to `depth` items ahead. An item that `load` or the preparation rejects (ValueError, OSError)
        gives a Result with `error`, and the run goes on."""

        def work(item):
            image = load(item) if load is not None else item
            check_image(image)
            return image, self.prepare(image)

        for fetched in prefetch(items, work, depth):
            if fetched.error is not None:
                yield Result(fetched.item, error=fetched.error)
                continue
            image, prepared = fetched.value
            records = self.generate(image, prepared=prepared)
            yield Result(fetched.item, records, seconds=self.last_seconds)

    def embed_images(self, images: List[np.ndarray]) -> List[Embedding]:
        """The whole images through the encoder in one forward (for generate(image, embedding=...)). In
        float32 on the CPU a batch gives each image its own bits; elsewhere batched kernels may round
        differently, which can move a borderline mask across a threshold."""
        for image in images:
            check_image(image)
        with torch.inference_mode():
            return self.adapter.embed([self.adapter.prepare(image, self._pin) for image in images])

    def prepare(self, image: np.ndarray, skip_whole: bool = False) -> PreparedImage:
        """The host-side work for one image: crop boxes, and each crop resized and normalized as the
        family's predictor does (skip_whole: not the whole image, whose embedding is given)."""
        boxes, layers = generate_crop_boxes(image.shape[:2], self.settings.crop_n_layers,
                                            self.settings.crop_overlap_ratio)
        crops = []
        for i, (box, layer) in enumerate(zip(boxes, layers)):
            x0, y0, x1, y1 = box
            crops.append((box, layer, None if i == 0 and skip_whole else
                          self.adapter.prepare(image[y0:y1, x0:x1, :], self._pin)))
        return PreparedImage(tuple(image.shape[:2]), crops)

    def run(self, prepared: PreparedImage, embedding: Optional[Embedding] = None) -> List[dict]:
        """The records of a prepared image (call under torch.inference_mode)."""
        crops = []
        for box, layer, prep in prepared.crops:
            if prep is None:
                if embedding is None:
                    raise ValueError("the whole image was not prepared: pass its embedding")
                emb = embedding
            else:
                [emb] = self.adapter.embed([prep])
            self.stopwatch.lap("encoder")
            crops.append(self._crop(emb, box, layer, prepared.size))
        return self._finish(crops, prepared.size)

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    # ---------------------------------------------------------------------------------------------
    # One crop
    # ---------------------------------------------------------------------------------------------

    def _crop(self, emb: Embedding, box: List[int], layer: int, size: Tuple[int, int]) -> CropMasks:
        """SamAutomaticMaskGenerator._process_crop: the crop's points in decoder batches, then its NMS.

        The decoder batches are queued back to back and filtered together, in groups of at most
        FILTER_BYTES of low-res logits (or one batch): a filter's few waits for the device (the sizes of
        what it keeps) are paid once per group, not once per batch, and it keeps the same masks in the
        same order as filtering batch by batch."""
        x0, y0, x1, y1 = box
        crop_size = (y1 - y0, x1 - x0)
        points = self.point_grids[layer] * np.array(crop_size)[None, ::-1]
        coords = self.adapter.prompt_coords(points, crop_size)
        batch = self.decoder_batch(len(points))
        parts, group, held, last, first = [], [], 0, 0, 0
        for s in range(0, len(points), batch):
            if group and held + last > FILTER_BYTES:  # the next batch would take the group over its bound
                parts.append(self._filter(group, first, batch, emb, box, size))
                held, first = 0, s // batch
            group.append(self._decode_points(emb, coords[s:s + batch], s))
            last = group[-1][0].numel() * group[-1][0].element_size()
            held += last
        parts.append(self._filter(group, first, batch, emb, box, size))
        low, boxes, iou, stability, index = (torch.cat(p) for p in zip(*parts))
        keep = batched_nms(boxes.float(), iou, self.adapter.nms_categories(boxes),
                           iou_threshold=self.settings.box_nms_thresh)
        low, boxes, iou, stability, index = (t[keep] for t in (low, boxes, iou, stability, index))
        self.stopwatch.lap("post")
        if self.adapter.point_dtype == np.float32:  # float32 + an integer tensor stays float32 in torch
            host_points = points.astype(np.float32) + np.array([x0, y0], dtype=np.float32)
        else:
            host_points = points + np.array([x0, y0])
        return CropMasks(low, uncrop_boxes_xyxy(boxes, box), iou, stability, index, box, emb, host_points)

    def _decode_points(self, emb: Embedding, coords: torch.Tensor, start: int):
        """One decoder batch, queued on the device (nothing waits for it): every mask's low-res logits,
        predicted IoU and point index."""
        s = self.settings
        n = coords.shape[0]
        labels = torch.ones(n, dtype=torch.int, device=coords.device)
        low, iou = self._decode(emb, coords[:, None, :], labels[:, None], None, s.multimask_output)
        per_point = low.shape[1]
        index = start + torch.arange(n * per_point, device=low.device) // per_point
        low, iou = low.flatten(0, 1), iou.flatten(0, 1)
        if s.use_m2m:
            low, iou = self._refine(emb, coords.repeat_interleave(per_point, dim=0), low)
        self.stopwatch.lap("decoder")
        return low, iou, index

    def _filter(self, group: list, first: int, batch: int, emb: Embedding, box, size):
        """SamAutomaticMaskGenerator._process_batch after the decoder, for a group of decoder batches
        (_decode_points' outputs, in order, of `batch` points each, the crop's batches first, first + 1, ...;
        the list is emptied, so that its logits go once filtered): the survivors' (low-res logits, boxes,
        predicted IoU, stability, point index), as the batches' results concatenated."""
        s = self.settings
        low, iou, index = (torch.cat(t) if len(t) > 1 else t[0] for t in zip(*group))
        n_batches = len(group)
        group.clear()
        if s.pred_iou_thresh > 0.0:
            low, iou, index = keep_where(iou > s.pred_iou_thresh, low, iou, index)
        if self.mode.stability_on == "low_res":
            stability = calculate_stability_score(self.adapter.low_res_view(low, emb), self.threshold,
                                                  s.stability_score_offset)
            if s.stability_score_thresh > 0.0:
                low, iou, index, stability = keep_where(stability >= s.stability_score_thresh,
                                                        low, iou, index, stability)
            self.stopwatch.lap("post")
            boxes = self._boxes(low, emb)
        else:
            if self.mode.low_res_margin is not None and s.stability_score_thresh > 0.0:
                rough = calculate_stability_score(self.adapter.low_res_view(low, emb), self.threshold,
                                                  s.stability_score_offset)
                low, iou, index = keep_where(rough >= s.stability_score_thresh - self.mode.low_res_margin,
                                             low, iou, index)
                self.stopwatch.lap("post")
            stability, boxes = self._boxes_and_stability(low, emb)
            if s.stability_score_thresh > 0.0:
                keep = stability >= s.stability_score_thresh
                low, iou, index, stability = keep_where(keep, low, iou, index, stability)
                boxes = boxes[keep] if len(low) else empty_boxes(self.device)
        # The reference boxes each batch's masks on their own: a batch left with none gives float32 boxes,
        # and concatenating them turns the crop's int boxes into floats. The same here, for the group (a
        # mask's batch is its point's index // batch).
        per_batch = torch.bincount(index // batch - first, minlength=n_batches) if n_batches > 1 and len(low) else None
        if per_batch is not None and bool((per_batch == 0).any()):
            boxes = boxes.float()
        self.stopwatch.lap("upsample")
        near = is_box_near_crop_edge(boxes, box, [0, 0, size[1], size[0]])
        if near.any():
            low, boxes, iou, stability, index = keep_where(~near, low, boxes, iou, stability, index)
        self.stopwatch.lap("post")
        return low, boxes, iou, stability, index

    def _decode(self, emb, coords, labels, mask_input, multimask_output):
        """The adapter's decode as the mode asks: padded to the compiled batch, under autocast; logits
        and IoUs as float32."""
        n, fixed = coords.shape[0], self.decoder_batch(coords.shape[0])
        if self.mode.compile_decoder is not None and n < fixed:  # one shape for the compiled graph
            pad = fixed - n
            coords, labels = (torch.cat([t, t[-1:].expand(pad, *t.shape[1:])]) for t in (coords, labels))
            if mask_input is not None:
                mask_input = torch.cat([mask_input, mask_input[-1:].expand(pad, *mask_input.shape[1:])])
        autocast = contextlib.nullcontext()
        if self.mode.decoder_dtype is not None and self.device.type == "cuda":
            autocast = torch.autocast("cuda", dtype=getattr(torch, self.mode.decoder_dtype))
        factored = self._factorable and mask_input is None and dense_attention(
            self.adapter.model, self.adapter.mask_decoder)  # not while a handle observes the decoder's calls
        with autocast:
            if factored:
                low, iou = self.adapter.decode_factored(emb, coords, labels, multimask_output)
            else:
                low, iou = self._decode_fn(emb, coords, labels, mask_input, multimask_output)
        return low[:n].float(), iou[:n].float()

    def _check_factorable(self, required: bool) -> bool:
        """Whether point_decoder.decode_points can stand in for the model's decoder (its layout; each call
        also asks for dense decoder attention). required (decoder="factored"): a ValueError instead of
        False, also for a decoder patched with a sparse policy now."""
        try:
            check_factorable(self.adapter.mask_decoder)
        except ValueError:
            if required:
                raise
            return False
        if required and not dense_attention(self.adapter.model, self.adapter.mask_decoder):
            raise ValueError("decoder='factored' computes dense decoder attention, and the model's decoder "
                             "attention is patched with a sparse policy (or by a handle of another object than "
                             "the model or its decoder); use decoder='model' or 'auto'")
        return True

    def _check_fused_upsample(self) -> bool:
        """Whether kernels.resize stands in for the adapter's upsampling (Mode.upsample): "fused" wherever
        the model's postprocessing is plain bilinear resizing (else a ValueError), "auto" there on CUDA."""
        if self.mode.upsample == "model":
            return False
        if not self.adapter.resizes_bilinearly():
            if self.mode.upsample == "fused":
                raise ValueError("upsample='fused' resizes bilinearly, and this SAM 2 model's postprocessing "
                                 "first fills holes and removes sprinkles (min_mask_region_area > 0); use "
                                 "upsample='model' or 'auto'")
            return False
        return self.mode.upsample == "fused" or self.device.type == "cuda"

    def _refine(self, emb, coords, low):
        """SAM2AutomaticMaskGenerator.refine_with_m2m: every mask through the decoder again, with its own
        (clamped) low-res logits as the mask prompt, one mask per point."""
        mask_input = torch.clamp(low, -32.0, 32.0)[:, None]
        labels = torch.ones(coords.shape[0], dtype=torch.int, device=coords.device)
        batch = self.decoder_batch(coords.shape[0])
        outs = [self._decode(emb, coords[s:s + batch, None, :], labels[s:s + batch, None], mask_input[s:s + batch], False)
                for s in range(0, coords.shape[0], batch)]
        return torch.cat([o[0] for o in outs]).flatten(0, 1), torch.cat([o[1] for o in outs]).flatten(0, 1)

    def decoder_batch(self, n: int) -> int:
        """Points per decoder call for n points: the settings' (the reference's), or the mode's, capped
        by free device memory (CUDA) or CPU_DECODER_BATCH, and by n (a compiled decoder: always the
        cap, the last batch padded to it)."""
        if self._max_batch is None:
            self._max_batch = self.settings.points_per_batch
            if self.mode.points_per_batch is not None:
                cap = CPU_DECODER_BATCH
                if self.device.type == "cuda":
                    free, _ = torch.cuda.mem_get_info(self.device)
                    cap = max(64, int(free * 0.5) // DECODER_BYTES_PER_POINT // 64 * 64)
                self._max_batch = min(self.mode.points_per_batch, cap)
        if self.mode.points_per_batch is None or self.mode.compile_decoder is not None:
            return self._max_batch
        return min(self._max_batch, n)

    # ---------------------------------------------------------------------------------------------
    # Upsampling, in chunks of masks
    # ---------------------------------------------------------------------------------------------

    def _chunk(self, low: torch.Tensor, emb: Embedding) -> int:
        """Masks per chunk: at most UPSAMPLE_BYTES of resized logits (all of them where the fused kernel
        holds none)."""
        if self.fused_upsample and self.device.type == "cuda":
            return max(1, len(low))
        h, w = emb.original_size
        per_mask = 4 * (h * w + max(low.shape[-1] * 4, 1024) ** 2)  # SAM 1 also holds the 1024 x 1024 step
        return max(1, UPSAMPLE_BYTES // per_mask)

    def _chunks(self, low: torch.Tensor, emb: Embedding):
        """(start, logits of low[start:start + m]) in chunks that hold at most UPSAMPLE_BYTES of logits."""
        step = self._chunk(low, emb)
        for start in range(0, len(low), step):
            yield start, self.adapter.upsample(low[start:start + step], emb)

    def _fused_stats(self, low: torch.Tensor, emb: Embedding):
        """kernels.resized_stats per chunk: the stability score and box of each upsampled mask."""
        size, mid = self.adapter.resize_plan(emb)
        step = self._chunk(low, emb)
        parts = [resized_stats(low[s:s + step], size, self.threshold, self.settings.stability_score_offset, mid)
                 for s in range(0, len(low), step)]
        counts, boxes = (torch.cat(t) for t in zip(*parts))
        return counts[:, 0] / counts[:, 1], boxes  # int32 / int32, as calculate_stability_score divides

    def _boxes(self, low: torch.Tensor, emb: Embedding) -> torch.Tensor:
        """batched_mask_to_box of the binarized, upsampled masks; float32 (0, 4) when there are none, as
        segment-anything's batched_mask_to_box gives (and its concatenation then turns a crop's int boxes
        into floats: kept, so records match)."""
        if len(low) == 0:
            return empty_boxes(self.device)
        if self.fused_upsample:
            return self._fused_stats(low, emb)[1]
        return torch.cat([batched_mask_to_box(logits > self.threshold) for _, logits in self._chunks(low, emb)])

    def _boxes_and_stability(self, low: torch.Tensor, emb: Embedding):
        """The stability score of each upsampled mask (segment-anything's calculate_stability_score) and
        the box of each binarized one."""
        if len(low) == 0:
            return low.new_zeros(0), empty_boxes(self.device)
        if self.fused_upsample:
            return self._fused_stats(low, emb)
        stability, boxes = [], []
        for _, logits in self._chunks(low, emb):
            stability.append(calculate_stability_score(logits, self.threshold, self.settings.stability_score_offset))
            boxes.append(batched_mask_to_box(logits > self.threshold))
        return torch.cat(stability), torch.cat(boxes)

    def _final_masks(self, crops: List[CropMasks], crop_id: torch.Tensor, row: torch.Tensor,
                     size: Tuple[int, int]) -> torch.Tensor:
        """(K, H, W) bool: each kept mask upsampled again from its crop's low-res logits (the same bits as
        when its box was found), binarized and placed in its crop's box."""
        masks = torch.zeros((len(row), *size), dtype=torch.bool, device=self.device)
        ids = crop_id.cpu()
        for c in ids.unique().tolist():
            where = (ids == c).nonzero().squeeze(1)
            crop = crops[c]
            x0, y0, x1, y1 = crop.box
            rows = row[where.to(row.device)]
            if self.fused_upsample:
                size, mid = self.adapter.resize_plan(crop.embedding)
                low, dest = crop.low_res[rows], where.to(self.device)
                step = self._chunk(low, crop.embedding)
                for s in range(0, len(low), step):
                    resized_masks(low[s:s + step], size, self.threshold, mid, out=masks, dest=dest[s:s + step],
                                  origin=(y0, x0))
                continue
            for start, logits in self._chunks(crop.low_res[rows], crop.embedding):
                masks[where[start:start + len(logits)].to(self.device), y0:y1, x0:x1] = logits > self.threshold
        return masks

    # ---------------------------------------------------------------------------------------------
    # All crops -> records
    # ---------------------------------------------------------------------------------------------

    def _finish(self, crops: List[CropMasks], size: Tuple[int, int]) -> List[dict]:
        """SamAutomaticMaskGenerator._generate_masks after the crops, and generate's records."""
        boxes = torch.cat([c.boxes for c in crops])
        iou = torch.cat([c.iou for c in crops])
        stability = torch.cat([c.stability for c in crops])
        point_index = torch.cat([c.point_index for c in crops])
        crop_id = torch.cat([torch.full((len(c.boxes),), i, device=self.device) for i, c in enumerate(crops)])
        row = torch.cat([torch.arange(len(c.boxes), device=self.device) for c in crops])
        # The reference's crop boxes, built the same way: torch.tensor of an empty list is float32 (0,),
        # and concatenating it turns the others into floats.
        crop_boxes = torch.cat([torch.tensor([c.box for _ in range(len(c.boxes))]) for c in crops])
        if len(boxes) == 0:  # no mask in any crop (the reference's crop NMS fails on that: box_area of nothing)
            self.stopwatch.lap("post")
            return []
        if len(crops) > 1:
            scores = (1 / box_area(crop_boxes)).to(boxes.device)  # prefer masks from smaller crops
            keep = batched_nms(boxes.float(), scores, self.adapter.nms_categories(boxes),
                               iou_threshold=self.settings.crop_nms_thresh)
            boxes, iou, stability, point_index, crop_id, row = (
                t[keep] for t in (boxes, iou, stability, point_index, crop_id, row))
            crop_boxes = crop_boxes[keep.cpu()]
        self.stopwatch.lap("post")
        if len(boxes) == 0:
            return []
        masks = self._final_masks(crops, crop_id, row, size)
        self.stopwatch.lap("upsample")
        fields = dict(boxes=boxes, iou=iou, stability=stability, point_index=point_index, crop_id=crop_id,
                      area=masks.flatten(1).sum(1))
        if self.output_mode != "binary_mask" or self.small_regions:
            fields.update(rle_runs(masks))
        else:
            fields["masks"] = masks
        self.stopwatch.lap("rle")
        host = to_host(fields)
        records = self._records(host, crop_boxes.numpy(), crops, size)
        self.stopwatch.lap("host")
        return records

    def _records(self, host: dict, crop_boxes: np.ndarray, crops: List[CropMasks], size) -> List[dict]:
        """generate's records from the host arrays: the reference's fields, dtypes and order."""
        starts = np.cumsum([0] + [len(c.points) for c in crops])
        points = np.concatenate([c.points for c in crops])[starts[host["crop_id"]] + host["point_index"]]
        data = dict(boxes=host["boxes"], iou_preds=host["iou"], points=points, stability_score=host["stability"],
                    crop_boxes=crop_boxes)
        if self.adapter.family == "sam2":  # SAM 2's MaskData.to_numpy casts every tensor to float32
            data = {k: v.astype(np.float32) for k, v in data.items()}
        rles = rle_counts(host["change"], host["first"], size) if "change" in host else None
        if self.small_regions:  # segment-anything's own host-side step, on its own MaskData
            from segment_anything import SamAutomaticMaskGenerator

            md = MaskData(rles=rles, **data)
            md = SamAutomaticMaskGenerator.postprocess_small_regions(
                md, self.settings.min_mask_region_area, max(self.settings.box_nms_thresh, self.settings.crop_nms_thresh))
            rles = md["rles"]
            data = {k: md[k] for k in data}
            areas = [area_from_rle(r) for r in rles]
            segmentations = [rle_to_mask(r) for r in rles] if self.output_mode == "binary_mask" else None
        else:
            areas = host["area"].tolist()
            segmentations = list(host["masks"]) if self.output_mode == "binary_mask" else None
        if self.output_mode == "coco_rle":
            segmentations = [coco_encode_rle(r) for r in rles]
        elif self.output_mode == "uncompressed_rle":
            segmentations = rles
        boxes, crop_boxes = data["boxes"].copy(), data["crop_boxes"].copy()
        for b in (boxes, crop_boxes):  # xyxy -> xywh in the array's own dtype, as box_xyxy_to_xywh
            b[:, 2:] -= b[:, :2].copy()
        iou, stability, points = data["iou_preds"].tolist(), data["stability_score"].tolist(), data["points"].tolist()
        boxes, crop_boxes = boxes.tolist(), crop_boxes.tolist()
        return [{"segmentation": segmentations[i], "area": areas[i], "bbox": boxes[i], "predicted_iou": iou[i],
                 "point_coords": [points[i]], "stability_score": stability[i], "crop_box": crop_boxes[i]}
                for i in range(len(segmentations))]


def keep_where(keep: torch.Tensor, *tensors: torch.Tensor):
    """Each tensor's rows where `keep` (bool, on the tensors' device) is True."""
    index = keep.nonzero().squeeze(1)
    return tuple(t.index_select(0, index) for t in tensors)


def empty_boxes(device) -> torch.Tensor:
    """segment-anything's batched_mask_to_box of no masks: float32 (0, 4)."""
    return torch.zeros(0, 4, device=device)


def check_image(image) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 \
            or 0 in image.shape:
        got = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(f"image has {got}; expected a non-empty HxWx3 uint8 RGB array")


def generate(model, image: np.ndarray, settings: Optional[GeneratorSettings] = None, mode: Union[str, Mode] = "exact",
             output_mode: str = "binary_mask", **changes) -> List[dict]:
    """The records of one image: AutomaticMaskGenerator(model, mode, settings, output_mode).generate(image).
    model: a segment-anything Sam (MobileSAM too), a sam2 SAM2Base, or a predictor of one."""
    return AutomaticMaskGenerator(model, mode, settings, output_mode, **changes).generate(image)
