"""SamPredictor.set_image with the resize on the model's device, and an encoder in another dtype.

segment-anything's set_image resizes the photo with PIL on the CPU (about 34 ms for a 1500 x 2250
photo, more than a patched bf16 encoder takes on an H200) and runs the encoder in the predictor's
dtype. set_image_on_device does the same steps on the GPU and lets the image encoder run in bf16 or
fp16 while the prompt encoder and mask decoder stay float32 (SAM's predictor needs them in float32):

    sam.image_encoder.to(torch.bfloat16)          # the rest of sam stays float32
    predictor = SamPredictor(sam)
    set_image_on_device(predictor, image)         # instead of predictor.set_image(image)
    masks, scores, _ = predictor.predict(point_coords=..., point_labels=...)

Its resize is torch's antialiased bilinear, not PIL's: docs/benchmarks.md gives the mask IoU between
the two on the sample photos (scripts/resize_parity.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def set_image_on_device(predictor, image: np.ndarray, image_format: str = "RGB") -> None:
    """predictor.set_image(image), with the resize and normalization on the model's device.

    image: HxWx3 uint8, in image_format ("RGB" or "BGR"). The encoder runs in its own parameters'
    dtype; its features are handed to the predictor as float32.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format={image_format!r}: expected 'RGB' or 'BGR'")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"shape {getattr(image, 'shape', None)}, dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(f"image has {got}; expected an HxWx3 uint8 array")
    model = predictor.model
    if image_format != model.image_format:
        image = image[..., ::-1]
    h, w = image.shape[:2]
    target = predictor.transform.get_preprocess_shape(h, w, predictor.transform.target_length)
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(predictor.device, non_blocking=True)
    x = pixels.permute(2, 0, 1)[None].float()
    # Antialiased like PIL's resize; rounded to whole pixel values as SAM's uint8 path is.
    x = F.interpolate(x, size=target, mode="bilinear", antialias=True, align_corners=False).round_().clamp_(0, 255)
    predictor.reset_image()
    predictor.original_size = (h, w)
    predictor.input_size = tuple(x.shape[-2:])
    encoder = model.image_encoder
    dtype = next(encoder.parameters()).dtype
    predictor.features = encoder(model.preprocess(x).to(dtype)).float()
    predictor.is_image_set = True


def image_predictor(model):
    """The image predictor of the model's family, ready for set_image(image) / predict(point_coords,
    point_labels, box, multimask_output=...): segment-anything's SamPredictor for a Sam, sam2's
    SAM2ImagePredictor for a SAM 2 model (told the feature sizes of the model's image size)."""
    from .patches import model_family

    if model_family(model) == "sam2":
        from .patches.sam2 import image_predictor as sam2_image_predictor

        return sam2_image_predictor(model)
    from segment_anything import SamPredictor

    return SamPredictor(model)


def predict_points(predictor, points: np.ndarray, multimask_output: bool = True):
    """Each pixel point (x, y) of `points` (P, 2) as its own one-point foreground prompt, all in one decoder
    batch, on the image set last (SamPredictor.predict_torch, or SAM2ImagePredictor's batched path).
    Returns (masks (P, C, H, W) bool, scores (P, C)) on the predictor's device."""
    from segment_anything import SamPredictor

    pts = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if isinstance(predictor, SamPredictor):
        coords = predictor.transform.apply_coords(pts, predictor.original_size)
        coords = torch.as_tensor(coords, dtype=torch.float, device=predictor.device)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=predictor.device)
        masks, scores, _ = predictor.predict_torch(coords, labels, multimask_output=multimask_output)
        return masks, scores
    _, coords, labels, _ = predictor._prep_prompts(pts[:, None, :], np.ones((len(pts), 1), np.int64), None, None, True)
    masks, scores, _ = predictor._predict(coords, labels, multimask_output=multimask_output)
    return masks, scores
