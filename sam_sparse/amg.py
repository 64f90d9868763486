"""Automatic mask generation over many images: what `sam-sparse amg` runs, on one device or one rank of
a torchrun job.

    paths = find_images("photos/")
    records = generate_masks(model, paths, "out/", GeneratorSettings(points_per_side=32))

Each image goes through segment-anything's own SamAutomaticMaskGenerator on the (patched) model, so
the masks are the unpatched generator's up to what the policy changes. Its two run-length helpers are
swapped for versions with the same output (MaskGenerator): post-processing, not attention, is where
most of an AMG image's time goes (docs/benchmarks.md). Outputs follow segment-anything's
scripts/amg.py: `binary_mask` writes a folder per image with one PNG per mask (0/255) and metadata.csv;
`coco_rle` writes one JSON per image with COCO RLE masks and the same fields. An image's output is
written under a temporary name and renamed when complete, so a rerun skips complete images and redoes
partial ones. A run manifest (model, policy, version, arguments, per image: status, masks, seconds) is
written as manifest.json.

batch_images=N runs the image encoder on N images per forward (embed_images), then the generator on
each image with its set_image short-circuited to that image's features (precomputed_embedding). This
holds only without crop layers: with crop_n_layers > 0 each crop needs its own embedding, so the
generator embeds every crop itself, one at a time, as with N=1. The outputs are N=1's byte for byte
where the encoder gives each image of a batch the same bits as it gets alone (MobileSAM on CPU in
float32 does); elsewhere batched matmuls may sum in another order (ViT-B on CPU: features within
~4e-6), which can move a borderline score across a threshold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything import automatic_mask_generator as sa_amg

from .files import atomic_path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_MODES = ("binary_mask", "coco_rle")
METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                   "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
TMP_MARK = ".tmp-"


@dataclass(frozen=True)
class GeneratorSettings:
    """SamAutomaticMaskGenerator's parameters, with segment-anything's names and defaults."""

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
            if not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}={v!r}: expected a number from 0 to 1")


def find_images(spec: os.PathLike) -> List[Path]:
    """The images INPUT names: an image file, a folder (recursively, IMAGE_SUFFIXES), or a text file with
    one path per line (relative paths are relative to the list's folder; blank lines and # comments skipped).
    ValueError when nothing is found or a listed path is missing."""
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise ValueError(f"input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
        return found
    if not path.is_file():
        raise ValueError(f"input {path}: no such file or folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    if path.suffix.lower() != ".txt":
        raise ValueError(f"input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)}), a folder or a .txt list")
    listed = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line) if Path(line).is_absolute() else path.parent / line
        if not p.is_file():
            raise ValueError(f"{path}:{n}: {line}: no such file")
        listed.append(p)
    if not listed:
        raise ValueError(f"input {path}: lists no image")
    return listed


def output_names(paths: Sequence[Path], root: Optional[Path]) -> Dict[Path, str]:
    """A unique output name per image: its path under `root` without suffix, folders joined by "__"
    (a flat folder gives amg.py's names: the file name without its suffix)."""
    names = {}
    for p in paths:
        try:
            rel = p.relative_to(root) if root is not None else Path(p.name)
        except ValueError:
            rel = Path(p.name)
        names[p] = "__".join(rel.with_suffix("").parts)
    seen: Dict[str, Path] = {}
    for p, n in names.items():
        if n in seen:
            raise ValueError(f"images {seen[n]} and {p} would both be written as {n!r}; rename one")
        seen[n] = p
    return names


def shard(paths: Sequence[Path], sizes: Sequence[int], rank: int, world: int) -> List[Path]:
    """This rank's images: a deterministic split balanced by image size (largest first, each to the rank
    with the least work so far, ties to the lower rank)."""
    load = [0] * world
    mine = []
    for i in sorted(range(len(paths)), key=lambda i: (-sizes[i], str(paths[i]))):
        r = min(range(world), key=lambda k: (load[k], k))
        load[r] += max(1, sizes[i])
        if r == rank:
            mine.append(paths[i])
    return sorted(mine)


def image_pixels(path: Path) -> int:
    """Width x height from the file header (0 when unreadable: it will fail, and be recorded, later)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:
        return 0


def output_path(out_dir: Path, name: str, mode: str) -> Path:
    return out_dir / (name if mode == "binary_mask" else f"{name}.json")


def is_complete(out_dir: Path, name: str, mode: str) -> bool:
    """Outputs only ever appear by a rename of a complete temporary, so existing means complete."""
    target = output_path(out_dir, name, mode)
    return (target / "metadata.csv").is_file() if mode == "binary_mask" else target.is_file()


def remove_partial(out_dir: Path, name: str) -> None:
    """Temporaries an interrupted run left for this image."""
    for p in out_dir.glob(f".{name}{TMP_MARK}*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def write_binary_masks(masks: List[dict], folder: Path) -> None:
    """amg.py's binary_mask layout: {i}.png (0/255) per mask and metadata.csv, in a folder renamed into
    place when complete."""
    from PIL import Image

    tmp = folder.parent / f".{folder.name}{TMP_MARK}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rows = [METADATA_HEADER]
    for i, m in enumerate(masks):
        Image.fromarray(m["segmentation"].astype(np.uint8) * 255).save(tmp / f"{i}.png")
        rows.append(",".join([str(i), str(m["area"]), *map(str, m["bbox"]), *map(str, m["point_coords"][0]),
                              str(m["predicted_iou"]), str(m["stability_score"]), *map(str, m["crop_box"])]))
    (tmp / "metadata.csv").write_text("\n".join(rows))
    if folder.exists():  # --overwrite: the old output goes only once the new one is complete
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def write_rle_json(masks: List[dict], path: Path) -> None:
    """amg.py's coco_rle layout: the generator's records, segmentation as COCO RLE, one JSON per image."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(masks))


def embed_images(predictor, images: Sequence[np.ndarray]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
    """SamPredictor.set_image's preprocessing for each image, then one image_encoder forward for all.

    images: HxWx3 uint8 RGB arrays, any sizes. Returns the features, (N, C, h, w) ((N, 256, 64, 64) for
    SAM) in the encoder's dtype, and each image's size after ResizeLongestSide, (h, w) in pixels.
    Call it under torch.inference_mode or no_grad.
    """
    model = predictor.model
    inputs, sizes = [], []
    for image in images:
        # The steps of SamPredictor.set_image + set_torch_image, so each image gets the same input tensor.
        if model.image_format != "RGB":
            image = image[..., ::-1]
        x = torch.as_tensor(predictor.transform.apply_image(image), device=predictor.device)
        x = x.permute(2, 0, 1).contiguous()[None]
        sizes.append(tuple(x.shape[-2:]))
        inputs.append(model.preprocess(x))  # normalized and padded to img_size x img_size: stackable
    return model.image_encoder(torch.cat(inputs)), sizes


@contextlib.contextmanager
def precomputed_embedding(predictor, features: torch.Tensor, input_size: Tuple[int, int], image: np.ndarray):
    """Within the block, predictor.set_image(image) sets `features` (1, C, h, w) instead of running the
    encoder; set_image with any other image raises RuntimeError (a crop would need its own embedding)."""

    def set_image(given: np.ndarray, image_format: str = "RGB") -> None:
        if given.shape != image.shape:
            raise RuntimeError(f"set_image on a {given.shape} array, but the precomputed features are of a "
                               f"{image.shape} image; crops need their own embedding (batch_images=1)")
        # What set_torch_image leaves behind, with the batch's features.
        predictor.reset_image()
        predictor.original_size = image.shape[:2]
        predictor.input_size = input_size
        predictor.features = features
        predictor.is_image_set = True

    predictor.set_image = set_image  # an instance attribute shadows the class's method...
    try:
        yield
    finally:
        del predictor.set_image  # ...and removing it brings the method back


def mask_to_rle(masks: torch.Tensor) -> List[dict]:
    """segment-anything's mask_to_rle_pytorch, the same output: masks (B, H, W) bool -> B uncompressed
    RLEs {"size": [H, W], "counts": [...]} in column-major order, the first count for zeros.

    The run boundaries of the whole batch come to the host in one copy; the original reads them (and
    each mask's first pixel) once per mask, two GPU syncs per mask."""
    b, h, w = masks.shape
    flat = masks.permute(0, 2, 1).flatten(1)
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero()  # (n, 2) in row-major order: by mask, then position
    change, first = change.cpu(), flat[:, 0].cpu()
    per_mask = torch.bincount(change[:, 0], minlength=b).tolist()
    ends = change[:, 1] + 1
    out, start = [], 0
    for i in range(b):
        stop = start + per_mask[i]
        edges = torch.cat([ends.new_zeros(1), ends[start:stop], ends.new_full((1,), h * w)])
        counts = [] if not first[i] else [0]
        counts.extend((edges[1:] - edges[:-1]).tolist())
        out.append({"size": [h, w], "counts": counts})
        start = stop
    return out


def rle_to_mask(rle: dict) -> np.ndarray:
    """segment-anything's rle_to_mask, the same output (H, W) bool, with one np.repeat instead of a Python
    step per run."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = (np.arange(len(counts)) % 2).astype(bool)  # runs alternate, zeros first
    return np.repeat(values, counts).reshape(w, h).transpose()


@contextlib.contextmanager
def _fast_rle():
    # SamAutomaticMaskGenerator calls these through its module's namespace; swapping them there (for
    # one generate call) keeps every other line of segment-anything's generator as it is.
    saved = sa_amg.mask_to_rle_pytorch, sa_amg.rle_to_mask
    sa_amg.mask_to_rle_pytorch, sa_amg.rle_to_mask = mask_to_rle, rle_to_mask
    try:
        yield
    finally:
        sa_amg.mask_to_rle_pytorch, sa_amg.rle_to_mask = saved


class MaskGenerator(SamAutomaticMaskGenerator):
    """segment-anything's SamAutomaticMaskGenerator (same arguments) with mask_to_rle / rle_to_mask above:
    the same masks and RLEs, sooner. The swap is process-wide while generate runs: one generating
    thread per process (as the amg job runs)."""

    def generate(self, image: np.ndarray) -> List[dict]:
        with _fast_rle():
            return super().generate(image)


def generate_masks(
    model,
    paths: Sequence[Path],
    out_dir: os.PathLike,
    settings: GeneratorSettings = GeneratorSettings(),
    *,
    output_mode: str = "binary_mask",
    names: Optional[Dict[Path, str]] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    batch_images: int = 1,
) -> List[dict]:
    """Run SamAutomaticMaskGenerator over `paths`, writing each image's masks under `out_dir`.

    batch_images: images per image-encoder forward (the next N images still to do, in order); used only
    with settings.crop_n_layers == 0, else every image (and crop) is embedded on its own.
    Returns one record per image, in the order of `paths`: image, output, status ("done", "skipped":
    complete from an earlier run, "failed"), masks, seconds (its own work plus an equal share of its
    batch's encoder forward), error. An unreadable image is recorded as failed and the run goes on.
    progress(masks) is called after each image.
    """
    if output_mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode={output_mode!r}: expected one of {', '.join(OUTPUT_MODES)}")
    if not isinstance(batch_images, int) or isinstance(batch_images, bool) or batch_images < 1:
        raise ValueError(f"batch_images={batch_images!r}: expected an integer >= 1")
    out_dir = Path(out_dir)
    names = names or output_names(paths, None)
    generator = MaskGenerator(model, output_mode=output_mode, **dataclasses.asdict(settings))
    batched = batch_images > 1 and settings.crop_n_layers == 0
    records: List[dict] = []
    pending: List[Tuple[Path, dict]] = []  # images to do, waiting for a full batch
    for path in paths:
        name = names[path]
        target = output_path(out_dir, name, output_mode)
        record = dict(image=str(path), output=str(target), status="done", masks=0, seconds=0.0, error=None)
        records.append(record)
        if is_complete(out_dir, name, output_mode) and not overwrite:
            record.update(status="skipped", masks=_mask_count(target, output_mode))
            if progress is not None:
                progress(record["masks"])
            continue
        remove_partial(out_dir, name)
        pending.append((path, record))
        if len(pending) == (batch_images if batched else 1):
            _run_batch(generator, pending, output_mode, batched, progress)
            pending = []
    if pending:
        _run_batch(generator, pending, output_mode, batched, progress)
    return records


def _run_batch(generator, jobs: List[Tuple[Path, dict]], output_mode: str, batched: bool, progress) -> None:
    """Masks for each (path, record) in `jobs`, filling the record. batched: one encoder forward for all
    readable images of `jobs`; else the generator's own set_image embeds each image (and crop)."""
    from .segment import load_image

    loaded = []  # (image, record) of the readable images
    for path, record in jobs:
        t0 = time.perf_counter()
        try:
            loaded.append((load_image(path), record))
        except (ValueError, OSError) as e:  # unreadable or corrupt: recorded, the batch goes on without it
            record.update(status="failed", error=" ".join(str(e).split()))
        record["seconds"] += time.perf_counter() - t0
    if batched and loaded:
        t0 = time.perf_counter()
        with torch.inference_mode():
            features, sizes = embed_images(generator.predictor, [image for image, _ in loaded])
        share = (time.perf_counter() - t0) / len(loaded)
    for i, (image, record) in enumerate(loaded):
        t0 = time.perf_counter()
        embedding = contextlib.nullcontext()
        if batched:
            embedding = precomputed_embedding(generator.predictor, features[i:i + 1], sizes[i], image)
            record["seconds"] += share
        try:
            with embedding, torch.inference_mode():
                masks = generator.generate(image)
            if output_mode == "binary_mask":
                write_binary_masks(masks, Path(record["output"]))
            else:
                write_rle_json(masks, Path(record["output"]))
            record["masks"] = len(masks)
        except (ValueError, OSError) as e:  # a full disk
            record.update(status="failed", error=" ".join(str(e).split()))
        record["seconds"] += time.perf_counter() - t0
    for _, record in jobs:  # in input order, failed ones included
        record["seconds"] = round(record["seconds"], 3)
        if progress is not None:
            progress(record["masks"])


def _mask_count(target: Path, mode: str) -> int:
    if mode == "binary_mask":
        return max(0, len((target / "metadata.csv").read_text().splitlines()) - 1)
    return len(json.loads(target.read_text()))


def write_manifest(path: Path, run: dict, records: List[dict]) -> None:
    """manifest.json: the run (model, policy, version, arguments) and one record per image, sorted."""
    body = dict(run, images=sorted(records, key=lambda r: r["image"]))
    body["summary"] = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed")}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(body, indent=1))
