"""Automatic mask generation over many images: what `sam-sparse amg` runs, on one device or one rank of
a torchrun job.

    paths = find_images("photos/")
    records = generate_masks(model, paths, "out/", GeneratorSettings(points_per_side=32), mode="fast")

Each image goes through sam_sparse.maskgen's AutomaticMaskGenerator on the (patched) model: mode "exact"
gives segment-anything's SamAutomaticMaskGenerator's records (the same masks, fields and order), mode
"fast" the same pipeline with large decoder batches and a low-res stability prefilter, its agreement
measured (docs/benchmarks.md). Outputs follow segment-anything's
scripts/amg.py: `binary_mask` writes a folder per image with one PNG per mask (0/255) and metadata.csv;
`coco_rle` writes one JSON per image with COCO RLE masks and the same fields. An image's output is
written under a temporary name and renamed when complete, so a rerun skips complete images and redoes
partial ones. A run manifest (model, policy, version, arguments, per image: status, masks, seconds) is
written as manifest.json.

batch_images=N runs the image encoder on N images per forward (AutomaticMaskGenerator.embed_images),
then the generator on each image with its embedding. This holds only without crop layers: with
crop_n_layers > 0 each image is embedded on its own, as with N=1. The outputs are N=1's byte for byte
where the encoder gives each image of a batch the same bits as it gets alone (MobileSAM on CPU in
float32 does); elsewhere batched matmuls may sum in another order (ViT-B on CPU: features within
~4e-6), which can move a borderline score across a threshold.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .files import atomic_path
from .maskgen import AutomaticMaskGenerator, GeneratorSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_MODES = ("binary_mask", "coco_rle")
METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                   "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
TMP_MARK = ".tmp-"
MODES = ("exact", "fast")


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
    mode: str = "exact",
) -> List[dict]:
    """Generate every image's masks (maskgen.AutomaticMaskGenerator in `mode`: "exact" or "fast"), writing
    them under `out_dir`.

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
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
    out_dir = Path(out_dir)
    names = names or output_names(paths, None)
    generator = AutomaticMaskGenerator(model, mode, settings, output_mode=output_mode)
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
        embeddings = generator.embed_images([image for image, _ in loaded])
        share = (time.perf_counter() - t0) / len(loaded)
    for i, (image, record) in enumerate(loaded):
        t0 = time.perf_counter()
        if batched:
            record["seconds"] += share
        try:
            masks = generator.generate(image, embedding=embeddings[i] if batched else None)
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
