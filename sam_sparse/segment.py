"""Segment one image with a (patched) SAM and draw the result: what `sam-sparse segment` and `demo` run.

    image = load_image("astronaut")                     # a file path, or a scikit-image sample name
    masks, scores = segment_image(model, image, points=[(250, 120)])
    save_overlay("overlay.png", image, masks, points=[(250, 120)])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .files import atomic_path

# scikit-image's sample photographs (shipped with the package, no download).
SAMPLES = ("astronaut", "coffee", "chelsea", "horse")
PathLike = Union[str, os.PathLike]


def load_image(spec: PathLike) -> np.ndarray:
    """An HxWx3 uint8 RGB array from an image file, upright by its EXIF orientation (as a viewer shows it,
    and as OpenCV's imread reads it), or from a scikit-image sample name (SAMPLES).

    "horse" is a black-and-white silhouette; it is drawn as a brown horse on a light sky.
    """
    name = str(spec)
    if name in SAMPLES and not Path(name).exists():
        from skimage import data

        img = getattr(data, name)()
        if img.dtype == bool:  # the horse: True is background
            img = np.where(img[..., None], np.array([200, 220, 240]), np.array([120, 80, 50]))
        return np.ascontiguousarray(img.astype(np.uint8))
    path = Path(spec)
    if path.is_dir():
        raise ValueError(f"image {path}: is a folder; expected an image file (or a sample: {', '.join(SAMPLES)})")
    if not path.is_file():
        raise ValueError(f"image {path}: no such file (or use a sample: {', '.join(SAMPLES)})")
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            # Upright as a viewer shows it (EXIF orientation, as OpenCV's imread, which segment-anything's
            # scripts/amg.py reads with): prompts are given, and masks drawn, in those pixels.
            im = ImageOps.exif_transpose(opened)
            if im.mode in ("I;16", "I;16L", "I;16B", "I"):
                return _to_8_bit_rgb(np.asarray(im), path)
            if im.mode == "F":
                raise ValueError(f"image {path}: holds floating-point pixels (PIL mode F); save it as 8- or 16-bit")
            return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:  # PIL's guard against images of more than ~179 megapixels
        raise ValueError(f"image {path}: too large to read ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path}: cannot be read as an image ({e})") from None


def _to_8_bit_rgb(gray: np.ndarray, path) -> np.ndarray:
    """A 16-bit grayscale image (0..65535) as 8-bit RGB, scaled rather than clipped (PIL's convert("RGB")
    clips every value above 255 to white)."""
    if gray.min() < 0 or gray.max() > 65535:
        raise ValueError(f"image {path}: pixel values {gray.min()}..{gray.max()} are outside 16 bits; expected 0..65535")
    g8 = np.round(gray.astype(np.float64) / 257.0).astype(np.uint8)
    return np.ascontiguousarray(np.repeat(g8[..., None], 3, axis=-1))


def parse_numbers(text: str, count: int, what: str) -> Tuple[float, ...]:
    """'X,Y' -> (x, y) (count=2); 'X0,Y0,X1,Y1' -> 4 floats (count=4). ValueError names the problem."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != count or not all(np.isfinite(values)):
        raise ValueError(f"{what} {text!r}: expected {count} comma-separated numbers")
    return values


def check_prompts(image: np.ndarray, points=None, boxes=None, background=None) -> None:
    """Points and boxes must lie inside the image (pixel coordinates, x right, y down), points go with at
    most one box (SAM's prompt is points + one box), and background points go with a point or a box
    (they say what is not the object)."""
    if (points is not None or background is not None) and boxes is not None and len(boxes) > 1:
        raise ValueError("points go with at most one box (SAM's prompt is points + one box); give several boxes alone")
    if background is not None and points is None and boxes is None:
        raise ValueError("background points (--neg-point) go with a --point or a --box: they say what is not the object")
    check_prompt_bounds(image, [*(points or ()), *(background or ())], boxes)


def check_prompt_bounds(image: np.ndarray, points=None, boxes=None) -> None:
    """Points (x, y) and boxes (x0, y0, x1, y1) must lie inside the image, in pixels (x right, y down)."""
    h, w = image.shape[:2]
    for x, y in points or ():
        if not (0 <= x <= w and 0 <= y <= h):
            raise ValueError(f"point {x:g},{y:g} is outside the {w}x{h} image")
    for x0, y0, x1, y1 in boxes if boxes is not None else ():
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g}: expected X0<X1 and Y0<Y1")
        if not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
            raise ValueError(f"box {x0:g},{y0:g},{x1:g},{y1:g} is outside the {w}x{h} image")


def segment_image(
    model,
    image: np.ndarray,
    points: Optional[Sequence[Sequence[float]]] = None,
    boxes: Optional[Sequence[Sequence[float]]] = None,
    multimask: bool = False,
    background: Optional[Sequence[Sequence[float]]] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Masks (K, H, W) bool and scores (K,) for one image through the model's image predictor (SamPredictor,
    or SAM2ImagePredictor for a SAM 2 model).

    points: foreground points (x, y), all one prompt (SamPredictor's label 1). background: points (x, y)
    that are not the object (label 0), part of the same prompt; they need points or one box. boxes:
    (x0, y0, x1, y1), each its own prompt; points may go with one box (one prompt). None of these: one
    point at the image centre. multimask: SAM's three candidate masks per prompt, best first; otherwise
    one mask per prompt.
    """
    from segment_anything import SamPredictor

    from .predictor import image_predictor

    check_prompts(image, points, boxes, background)
    if points is None and boxes is None:
        h, w = image.shape[:2]
        points = [(w / 2, h / 2)]
    predictor = image_predictor(model)
    with torch.inference_mode():
        predictor.set_image(image)
        pts = labels = None
        if points is not None or background is not None:
            pts = np.asarray([*(points or ()), *(background or ())], dtype=np.float32).reshape(-1, 2)
            labels = np.array([1] * len(points or ()) + [0] * len(background or ()), dtype=np.int64)
        bxs = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) if boxes is not None else None
        if bxs is None or len(bxs) == 1:
            masks, scores, _ = predictor.predict(
                point_coords=pts, point_labels=labels, box=None if bxs is None else bxs[0], multimask_output=multimask
            )
        elif isinstance(predictor, SamPredictor):
            t_boxes = predictor.transform.apply_boxes_torch(torch.as_tensor(bxs, device=predictor.device),
                                                            predictor.original_size)
            m, s, _ = predictor.predict_torch(None, None, boxes=t_boxes, multimask_output=multimask)
            masks, scores = m.flatten(0, 1).cpu().numpy(), s.flatten().float().cpu().numpy()
        else:  # SAM2ImagePredictor.predict takes the boxes as a batch: (K, C, H, W) masks
            m, s, _ = predictor.predict(box=bxs, multimask_output=multimask)
            masks, scores = m.reshape(-1, *m.shape[-2:]), s.reshape(-1)
    if multimask:
        order = np.argsort(-scores)
        masks, scores = masks[order], scores[order]
    return masks.astype(bool), np.asarray(scores, dtype=np.float32)


_COLORS = np.array([[30, 144, 255], [255, 64, 64], [64, 200, 64], [255, 200, 0], [200, 64, 255]], dtype=np.float32)


def overlay(image: np.ndarray, masks: np.ndarray, points=None, boxes=None, alpha: float = 0.5,
            background=None) -> np.ndarray:
    """The image with each mask tinted (blue, red, green, ...), its outline, the points (green), the
    background points (red) and the boxes drawn."""
    from skimage.segmentation import find_boundaries

    out = image.astype(np.float32).copy()
    for i, m in enumerate(masks):
        color = _COLORS[i % len(_COLORS)]
        out[m] = (1 - alpha) * out[m] + alpha * color
        out[find_boundaries(m, mode="thick")] = color
    out = out.clip(0, 255).astype(np.uint8)
    h, w = out.shape[:2]
    r = max(3, min(h, w) // 80)
    for (x, y), color in [*((p, (40, 220, 40)) for p in points or ()), *((p, (230, 30, 30)) for p in background or ())]:
        yy, xx = np.ogrid[:h, :w]
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        out[d2 <= (r + 2) ** 2] = (255, 255, 255)
        out[d2 <= r**2] = color
    for x0, y0, x1, y1 in boxes if boxes is not None else ():
        x0, y0 = int(max(0, x0)), int(max(0, y0))
        x1, y1 = int(min(w - 1, x1)), int(min(h - 1, y1))
        t = max(2, r // 2)
        for ys, xs in ((slice(y0, y0 + t), slice(x0, x1 + 1)), (slice(y1 - t + 1, y1 + 1), slice(x0, x1 + 1)),
                       (slice(y0, y1 + 1), slice(x0, x0 + t)), (slice(y0, y1 + 1), slice(x1 - t + 1, x1 + 1))):
            out[ys, xs] = (40, 220, 40)
    return out


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
MASK_SUFFIXES = (".npy", ".png")


def save_image(path: PathLike, array: np.ndarray, text: Optional[Dict[str, str]] = None) -> Path:
    """Write an HxW or HxWx3 uint8 array as PNG or JPEG, as the name says, atomically. text: PNG text chunks
    (a PNG's only)."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"image file {path}: expected a name ending in {' or '.join(IMAGE_FORMATS)}")
    options = {"optimize": True} if fmt == "PNG" else {"quality": 92}
    if text and fmt == "PNG":
        options["pnginfo"] = PngImagePlugin.PngInfo()
        for key, value in text.items():
            options["pnginfo"].add_text(key, value)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=fmt, **options)
    return path


def save_overlay(path: PathLike, image: np.ndarray, masks: np.ndarray, points=None, boxes=None,
                 background=None, text: Optional[Dict[str, str]] = None) -> Path:
    return save_image(path, overlay(image, masks, points, boxes, background=background), text)


def save_masks(path: PathLike, masks: np.ndarray) -> Path:
    """Masks as .npy ((K, H, W) bool) or .png (one mask: 0/255; several: label image, 0 = none, k = mask k).
    ValueError, writing nothing, for a PNG of masks that overlap: a label image would lose the overlap."""
    path = Path(path)
    if path.suffix.lower() not in MASK_SUFFIXES:
        raise ValueError(f"masks file {path}: expected a .npy or .png name")
    if path.suffix.lower() == ".npy":
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, masks.astype(bool))
        return path
    if len(masks) == 1:
        return save_image(path, masks[0].astype(np.uint8) * 255)
    if len(masks) > 255:
        raise ValueError(f"masks file {path}: {len(masks)} masks do not fit an 8-bit label PNG (255 at most); save "
                         "them as .npy")
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    for i, m in enumerate(masks):
        shared = m & (labels > 0)
        if shared.any():
            raise ValueError(f"masks file {path}: mask {i} overlaps mask {int(labels[shared][0]) - 1} (of the masks "
                             f"before it, in {int(shared.sum())} pixels), which one label PNG cannot hold; save them "
                             "as .npy")
        labels[m] = i + 1
    return save_image(path, labels)
