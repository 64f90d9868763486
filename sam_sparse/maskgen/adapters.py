"""One SAM family behind one small interface: host-side image preparation, the image embedding, the
prompt encoder + mask decoder call, and the upsampling of low-resolution logits to the image.

    adapter = adapter_for(model)              # a segment-anything Sam (MobileSAM too) or a sam2 SAM2Base
    prepared = adapter.prepare(image)         # host only (a worker thread may run it): resize, normalize
    [embedding] = adapter.embed([prepared])   # the image encoder
    low_res, iou = adapter.decode(embedding, coords, labels)   # (B, C, 256, 256), (B, C)
    logits = adapter.upsample(low_res[keep], embedding)         # (K, H, W) at the image's size

Each method runs the same calls, on the same tensors, as the family's own predictor (SamPredictor,
SAM2ImagePredictor), so the same model gives the same bits. What differs between the families:
  SAM 1: ResizeLongestSide (PIL) to 1024 on the long side, padded; points transformed in float64;
         logits upsampled 256 -> 1024, cropped to the resized image, then to the image; binarized at
         model.mask_threshold; records keep int boxes and float64 points.
  SAM 2: the image squashed to 1024 x 1024 (torchvision) and normalized on the host; points normalized
         in float32; high-resolution features from the encoder go to the decoder, which also returns
         object-score logits (ignored, as SAM2ImagePredictor ignores them); logits upsampled 256 -> image
         in one step, after optional hole / sprinkle removal (min_mask_region_area); the generator's
         own mask_threshold; records are float32 throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from ..patches import record_prompts
from .point_decoder import decode_points


@dataclass
class Prepared:
    """An image (or crop) ready for the encoder: `pixels` on the host, `size` (h, w) before resizing."""

    pixels: torch.Tensor
    size: Tuple[int, int]


@dataclass
class Embedding:
    """The encoder's output for one image (or crop): `features` as the family's predictor keeps them, the
    size (h, w) of the resized input and of the image it came from."""

    features: Any
    input_size: Tuple[int, int]
    original_size: Tuple[int, int]


def model_family(model) -> str:
    """"sam" for a segment-anything Sam (also MobileSAM), "sam2" for a sam2 SAM2Base; a SamPredictor /
    SAM2ImagePredictor counts as its model. TypeError for anything else."""
    model = getattr(model, "model", model)  # a predictor
    if all(hasattr(model, a) for a in ("image_encoder", "prompt_encoder", "mask_decoder")):
        return "sam"
    if all(hasattr(model, a) for a in ("forward_image", "sam_prompt_encoder", "sam_mask_decoder")):
        return "sam2"
    raise TypeError(f"{type(model).__name__}: expected a segment-anything Sam, a sam2 SAM2Base, or a predictor of one")


def adapter_for(model, min_mask_region_area: int = 0):
    """The adapter of the model's family (model_family); min_mask_region_area: SAM 2's hole / sprinkle
    removal before upsampling, as SAM2AutomaticMaskGenerator sets it up."""
    family = model_family(model)
    model = getattr(model, "model", model)
    return SamAdapter(model) if family == "sam" else Sam2Adapter(model, min_mask_region_area)


def _encoder_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class SamAdapter:
    """segment-anything's Sam: SamPredictor's steps."""

    family = "sam"
    point_dtype = np.float64  # the generator's points stay float64 numpy
    box_dtype = np.int64  # boxes of bool masks stay int64 (records hold ints)

    def __init__(self, model):
        from segment_anything.utils.transforms import ResizeLongestSide

        self.model = model
        self.transform = ResizeLongestSide(model.image_encoder.img_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def mask_threshold(self, settings) -> float:
        return self.model.mask_threshold

    def prepare(self, image: np.ndarray, pin: bool = False) -> Prepared:
        """SamPredictor.set_image's host steps: RGB order, ResizeLongestSide (PIL). image: HxWx3 uint8 RGB."""
        if self.model.image_format != "RGB":
            image = image[..., ::-1]
        pixels = torch.from_numpy(self.transform.apply_image(image))
        return Prepared(pixels.pin_memory() if pin else pixels, tuple(image.shape[:2]))

    def embed(self, prepared: List[Prepared]) -> List[Embedding]:
        """The image encoder on every prepared image in one forward (a batch of N when N > 1)."""
        inputs, sizes = [], []
        for p in prepared:
            x = p.pixels.to(self.device, non_blocking=True).permute(2, 0, 1).contiguous()[None, :, :, :]
            sizes.append(tuple(x.shape[-2:]))
            inputs.append(self.model.preprocess(x))  # normalized and padded to img_size x img_size
        encoder = self.model.image_encoder
        dtype = _encoder_dtype(encoder)
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs)
        features = encoder(x.to(dtype))
        if dtype != torch.float32:  # a bf16 / fp16 encoder: the decoder takes float32, as set_image_on_device
            features = features.float()
        if len(prepared) == 1:
            return [Embedding(features, sizes[0], prepared[0].size)]
        return [Embedding(features[i:i + 1], sizes[i], p.size) for i, p in enumerate(prepared)]

    def prompt_coords(self, points: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
        """The generator's points (n, 2) in pixels of an image of `size` -> the decoder's input frame
        (float64, as SamAutomaticMaskGenerator passes them)."""
        return torch.as_tensor(self.transform.apply_coords(points, size), device=self.device)

    def encode_prompts(self, points, boxes: Optional[torch.Tensor], masks: Optional[torch.Tensor]):
        """segment-anything's PromptEncoder.forward, the same bits, without waiting for the device: its
        _embed_points sets rows by boolean-mask indexing (`emb[labels == -1] = 0.0`, `+=` per label),
        each a nonzero() that syncs and cannot be captured in a CUDA graph; here torch.where picks the
        same sums (0.0 + weight for padding points, embedding + weight per label)."""
        pe = self.model.prompt_encoder
        bs = points[0].shape[0] if points is not None else boxes.shape[0] if boxes is not None else \
            masks.shape[0] if masks is not None else 1
        device = pe.point_embeddings[0].weight.device
        sparse = torch.empty((bs, 0, pe.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            coords = coords + 0.5  # the pixel's centre
            if boxes is None:  # a padding point
                coords = torch.cat([coords, torch.zeros((coords.shape[0], 1, 2), device=coords.device)], dim=1)
                labels = torch.cat([labels, -torch.ones((labels.shape[0], 1), device=labels.device)], dim=1)
            emb = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)
            labels = labels[..., None]
            emb = torch.where(labels == -1, torch.zeros_like(emb) + pe.not_a_point_embed.weight, emb)
            emb = torch.where(labels == 0, emb + pe.point_embeddings[0].weight, emb)
            emb = torch.where(labels == 1, emb + pe.point_embeddings[1].weight, emb)
            sparse = torch.cat([sparse, emb], dim=1)
        if boxes is not None:
            corners = pe.pe_layer.forward_with_coords((boxes + 0.5).reshape(-1, 2, 2), pe.input_image_size)
            corners[:, 0, :] += pe.point_embeddings[2].weight
            corners[:, 1, :] += pe.point_embeddings[3].weight
            sparse = torch.cat([sparse, corners], dim=1)
        if masks is not None:
            dense = pe.mask_downscaling(masks)
        else:
            dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, *pe.image_embedding_size)
        return sparse, dense

    def decode(self, embedding: Embedding, coords: Optional[torch.Tensor], labels: Optional[torch.Tensor],
               mask_input: Optional[torch.Tensor] = None, multimask_output: bool = True,
               boxes: Optional[torch.Tensor] = None):
        """predict_torch without the upsampling: coords (B, N, 2), labels (B, N) (or None), boxes (B, 4),
        mask_input (B, 1, 256, 256) -> low-res logits (B, C, 256, 256) and predicted IoUs (B, C);
        C = 3 with multimask_output, else 1."""
        model = self.model
        points = (coords, labels) if coords is not None else None
        record_prompts(model, points, boxes)  # what a prompt-dependent policy's decoder layers read
        sparse, dense = self.encode_prompts(points, boxes, mask_input)
        return model.mask_decoder(image_embeddings=embedding.features, image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask_output)

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.model.mask_decoder

    def decode_factored(self, embedding: Embedding, coords: torch.Tensor, labels: torch.Tensor,
                        multimask_output: bool = True):
        """decode for point prompts with no mask input through point_decoder.decode_points: the same
        float32 math with the image-side work the prompts share done once (check_factorable first)."""
        sparse, dense = self.encode_prompts((coords, labels), None, None)
        return decode_points(self.model.mask_decoder, embedding.features, self.model.prompt_encoder.get_dense_pe(),
                             sparse, dense[:1], multimask_output)

    def predict(self, embedding: Embedding, coords, labels, boxes, mask_input, multimask_output: bool,
                return_logits: bool):
        """SamPredictor.predict_torch on the embedding: masks (B, C, H, W) (bool, or logits), IoUs (B, C),
        low-res logits (B, C, 256, 256)."""
        low_res, iou = self.decode(embedding, coords, labels, mask_input, multimask_output, boxes)
        masks = self.model.postprocess_masks(low_res, embedding.input_size, embedding.original_size)
        return (masks if return_logits else masks > self.model.mask_threshold), iou, low_res

    def upsample(self, low_res: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """Sam.postprocess_masks on the masks (K, h, w) -> logits (K, H, W) at the image's size."""
        return _per_mask(lambda m: self.model.postprocess_masks(m, embedding.input_size, embedding.original_size),
                         low_res, embedding.original_size)

    def resizes_bilinearly(self) -> bool:
        """Whether upsample is plain bilinear resizing, which resize_plan describes: always for SAM 1."""
        return True

    def resize_plan(self, embedding: Embedding):
        """upsample as kernels.resize's arguments: ((H, W), (MH, MW, CH, CW)): Sam.postprocess_masks'
        bilinear steps to the encoder's square input, its top-left (the resized image), then the image."""
        s = int(self.model.image_encoder.img_size)
        h, w = (int(v) for v in embedding.input_size)
        return tuple(int(v) for v in embedding.original_size), (s, s, h, w)

    def low_res_view(self, low_res: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """The part of the low-res logits (K, h, w) that covers the image (the rest covers the padding)."""
        scale = low_res.shape[-1] / self.model.image_encoder.img_size
        h, w = embedding.input_size
        return low_res[..., :math.ceil(h * scale), :math.ceil(w * scale)]

    def nms_categories(self, boxes: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(boxes))  # as SamAutomaticMaskGenerator passes them (CPU, float)


class Sam2Adapter:
    """sam2's SAM2Base: SAM2ImagePredictor's steps (set_image, _predict)."""

    family = "sam2"
    point_dtype = np.float32  # SAM2AutomaticMaskGenerator keeps its points as float32 tensors
    box_dtype = np.float32  # and casts every record field to float32

    def __init__(self, model, min_mask_region_area: int = 0, transforms=None):
        """transforms: a SAM2Transforms to use (a SAM2ImagePredictor's own); default: what
        SAM2AutomaticMaskGenerator gives its predictor: holes and sprinkles up to min_mask_region_area
        removed from the low-res logits before upsampling, at the predictor's threshold (0.0)."""
        from sam2.utils.transforms import SAM2Transforms

        self.model = model
        self.transforms = transforms or SAM2Transforms(
            resolution=model.image_size, mask_threshold=0.0, max_hole_area=min_mask_region_area,
            max_sprinkle_area=min_mask_region_area)
        s = model.image_size
        self.feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]

    @property
    def device(self) -> torch.device:
        return self.model.device

    def mask_threshold(self, settings) -> float:
        return settings.mask_threshold

    def prepare(self, image: np.ndarray, pin: bool = False) -> Prepared:
        """SAM2ImagePredictor.set_image's host steps: to tensor, resize to image_size squared, normalize."""
        pixels = self.transforms(image)
        return Prepared(pixels.pin_memory() if pin else pixels, tuple(image.shape[:2]))

    def embed(self, prepared: List[Prepared]) -> List[Embedding]:
        model = self.model
        batch = torch.stack([p.pixels for p in prepared]).to(self.device, non_blocking=True)
        feats = sam2_features(model, model.forward_image(batch), self.feat_sizes)
        s = model.image_size
        return [Embedding({"image_embed": feats[-1][i:i + 1], "high_res_feats": [f[i:i + 1] for f in feats[:-1]]},
                          (s, s), p.size) for i, p in enumerate(prepared)]

    def prompt_coords(self, points: np.ndarray, size: Tuple[int, int]) -> torch.Tensor:
        pts = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        return self.transforms.transform_coords(pts, normalize=True, orig_hw=size)

    def decode(self, embedding: Embedding, coords: Optional[torch.Tensor], labels: Optional[torch.Tensor],
               mask_input: Optional[torch.Tensor] = None, multimask_output: bool = True,
               boxes: Optional[torch.Tensor] = None):
        """SAM2ImagePredictor._predict without the upsampling: (B, C, 256, 256) logits, (B, C) IoUs. A box
        is two corner points (labels 2, 3) ahead of the points, as _predict concatenates them; its labels
        are made on the device (_predict uploads them, a copy a CUDA graph cannot hold)."""
        model = self.model
        points = (coords, labels) if coords is not None else None
        if boxes is not None:
            corners = boxes.reshape(-1, 2, 2)
            corner_labels = torch.arange(2, 4, dtype=torch.int, device=boxes.device)[None].repeat(boxes.size(0), 1)
            points = (corners, corner_labels) if points is None else (
                torch.cat([corners, points[0]], dim=1), torch.cat([corner_labels, points[1]], dim=1))
        sparse, dense = model.sam_prompt_encoder(points=points, boxes=None, masks=mask_input)
        features = embedding.features
        low_res, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=features["image_embed"][-1].unsqueeze(0),
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask_output,
            repeat_image=points is not None and points[0].shape[0] > 1,
            high_res_features=[f[-1].unsqueeze(0) for f in features["high_res_feats"]])
        return low_res, iou

    @property
    def mask_decoder(self) -> torch.nn.Module:
        return self.model.sam_mask_decoder

    def decode_factored(self, embedding: Embedding, coords: torch.Tensor, labels: torch.Tensor,
                        multimask_output: bool = True):
        """decode for point prompts with no mask input through point_decoder.decode_points (the image
        embedding and high-resolution features as decode passes them; check_factorable first)."""
        model = self.model
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        features = embedding.features
        return decode_points(model.sam_mask_decoder, features["image_embed"][-1].unsqueeze(0),
                             model.sam_prompt_encoder.get_dense_pe(), sparse, dense[:1], multimask_output,
                             [f[-1].unsqueeze(0) for f in features["high_res_feats"]])

    def predict(self, embedding: Embedding, coords, labels, boxes, mask_input, multimask_output: bool,
                return_logits: bool, threshold: float = 0.0):
        """SAM2ImagePredictor._predict on the embedding: masks (B, C, H, W) (> threshold, or logits), IoUs
        (B, C), low-res logits clamped to +-32 (B, C, 256, 256)."""
        low_res, iou = self.decode(embedding, coords, labels, mask_input, multimask_output, boxes)
        masks = self.transforms.postprocess_masks(low_res, embedding.original_size)
        low_res = torch.clamp(low_res, -32.0, 32.0)
        return (masks if return_logits else masks > threshold), iou, low_res

    def upsample(self, low_res: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        return _per_mask(lambda m: self.transforms.postprocess_masks(m, embedding.original_size), low_res,
                         embedding.original_size)

    def resizes_bilinearly(self) -> bool:
        """Whether upsample is plain bilinear resizing: not where the transforms fill holes or remove
        sprinkles first (min_mask_region_area > 0)."""
        return not (self.transforms.max_hole_area > 0 or self.transforms.max_sprinkle_area > 0)

    def resize_plan(self, embedding: Embedding):
        """upsample as kernels.resize's arguments, ((H, W), None): one bilinear step to the image (where
        resizes_bilinearly())."""
        return tuple(int(v) for v in embedding.original_size), None

    def low_res_view(self, low_res: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        return low_res  # the whole 256 x 256 grid covers the (squashed) image

    def nms_categories(self, boxes: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(boxes[:, 0])


def sam2_features(model, backbone_out: dict, feat_sizes: List[Tuple[int, int]]) -> List[torch.Tensor]:
    """SAM2ImagePredictor.set_image's steps after model.forward_image: the backbone's features, the
    no-memory embedding added where the model adds it, as (n, C, h, w) per level, highest resolution first
    (the last is the image embedding). feat_sizes: (h, w) per level, highest first. It calls the same
    private sam2 method the predictor calls, so the features keep the predictor's memory layout and the
    decoder sees the same strides and sums alike."""
    _, vision_feats, _, _ = model._prepare_backbone_features(backbone_out)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    return [feat.permute(1, 2, 0).view(feat.shape[1], -1, *size)
            for feat, size in zip(vision_feats[::-1], feat_sizes[::-1])][::-1]


def _per_mask(postprocess, low_res: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """postprocess (the family's upsampling of a (N, C, h, w) batch) on masks (K, h, w), as one (1, K, h, w)
    batch: bilinear interpolation computes each channel alone, so a mask gets the bits it gets in the
    predictor's (B, 3, h, w) batch. K = 1 is run as two channels: a (1, 1, h, w) tensor is also
    channels-last contiguous, and interpolate may pick that kernel, which sums in another order. size: the
    (H, W) the postprocess gives, for an empty result."""
    k = low_res.shape[0]
    if k == 0:
        return low_res.new_zeros((0, *size), dtype=torch.float32)
    x = low_res[None] if k > 1 else low_res.repeat(2, 1, 1)[None]
    return postprocess(x)[0, :k]
