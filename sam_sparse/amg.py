"""Automatic mask generation over many images: what `sam-sparse amg` runs, on one device or one rank of
a torchrun job.

    paths = find_images("photos/")
    records = generate_masks(model, paths, "out/", GeneratorSettings(points_per_side=32), mode="fast")

Each image goes through sam_sparse.maskgen's AutomaticMaskGenerator on the (patched) model: mode "exact"
gives segment-anything's SamAutomaticMaskGenerator's records (the same masks, fields and order), mode
"fast" the same steps with up to 1024 points per decoder call through fused kernels (maskgen.settings),
its agreement measured (docs/benchmarks.md). Outputs follow segment-anything's
scripts/amg.py: `binary_mask` writes a folder per image with one PNG per mask (0/255) and metadata.csv;
`coco_rle` writes one JSON per image with COCO RLE masks and the same fields. An image's output is
written under a temporary name and renamed when complete, so a rerun skips complete images and redoes
partial ones. A run manifest (model, policy, version, arguments, per image: status, masks, seconds) is
written as manifest.json. Images stream (the default): the next images are read on a worker thread and
each image's outputs are written on another while the device works on the next image.

batch_images=N runs the image encoder on N images per forward (AutomaticMaskGenerator.embed_images),
then the generator on each image with its embedding. This holds only without crop layers: with
crop_n_layers > 0 each image is embedded on its own, as with N=1. The outputs are N=1's byte for byte
where the encoder gives each image of a batch the same bits as it gets alone (MobileSAM on CPU in
float32 does); elsewhere batched matmuls may sum in another order (ViT-B on CPU: features within
~4e-6), which can move a borderline score across a threshold.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import unicodedata
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .files import atomic_path
from .maskgen import AutomaticMaskGenerator, GeneratorSettings

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
OUTPUT_MODES = ("binary_mask", "coco_rle")
METADATA_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
                   "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
TMP_MARK = ".tmp-"
MODES = ("exact", "fast")
# PNG zlib level of the mask files: OpenCV's default, which segment-anything's amg.py writes with; 0/255
# masks compress about as well as at PIL's default 6, several times faster (the writing was the
# streamed fast mode's bottleneck).
PNG_COMPRESS_LEVEL = 1
WRITES_AHEAD = 2  # images whose outputs are being written while the next one generates (their masks in memory)


def find_images(spec: os.PathLike, exclude: Optional[os.PathLike] = None) -> List[Path]:
    """The images INPUT names: an image file, a folder (recursively, IMAGE_SUFFIXES; symbolic links to
    folders are not followed; `exclude`, a folder inside it such as --out, is skipped), or a text file
    with one path per line (relative paths are relative to the list's folder; blank lines and # comments
    skipped). Paths that cannot be read are returned all the same, to be recorded as failed: a broken
    symbolic link in a folder, a listed file that does not exist. ValueError when nothing is found or a
    list names one file twice."""
    path = Path(spec)
    if path.is_dir():
        skip = os.path.realpath(exclude) if exclude is not None else None
        found = []
        for folder, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) != skip]
            found += [Path(folder, f) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise ValueError(f"input {path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
        return sorted(found)
    if not path.is_file():
        raise ValueError(f"input {path}: no such file or folder")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return [path]
    if path.suffix.lower() != ".txt":
        raise ValueError(f"input {path}: expected an image ({', '.join(IMAGE_SUFFIXES)}), a folder or a .txt list")
    listed: Dict[str, Tuple[int, Path]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"input {path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a .txt list of "
                         "image paths, one per line") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line) if Path(line).is_absolute() else path.parent / line
        first = listed.setdefault(os.path.realpath(p), (n, p))
        if first[0] != n:
            raise ValueError(f"{path}:{n}: {line}: the same file as line {first[0]}; list each image once")
    if not listed:
        raise ValueError(f"input {path}: lists no image")
    return [p for _, p in listed.values()]


# Output names. An image's outputs are NAME (a folder) or NAME.json, NAME.overlay.png and temporaries
# .NAME.<...>.tmp-<...>; the job's own files are manifest.json and manifest.rank<R>.json. A name holds
# no dot and does not start with "-" or a space, so no name can be ".", "..", a path, a job file, another
# image's output or temporary, or read as an option.
NAME_CHARS = frozenset("_-+=,@() ")  # besides letters and digits
MAX_NAME_BYTES = 120  # of UTF-8, before the hash suffix: far below any file system's 255
HASH_MARK = "~"  # never in a name otherwise
MANIFEST = "manifest.json"
# Names a file system treats specially, compared case-folded: "manifest" (NAME.json would be the
# manifest), and Windows' device names (CON.json is the console there).
RESERVED_NAMES = frozenset(["manifest", "con", "prn", "aux", "nul"] + [f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10)])


def manifest_part(rank: int) -> str:
    """The file one rank of a torchrun job writes its records to, merged into manifest.json by rank 0."""
    return f"manifest.rank{rank}.json"


def name_key(name: str) -> str:
    """What a name is compared as: case-folded and normalized (NFC), so that names a case-insensitive or
    normalizing file system (macOS, Windows) takes for one file are equal."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def safe_name(text: str) -> str:
    """`text` (NFC) with every character but letters, digits, combining marks and NAME_CHARS replaced by
    "_" (dots, path separators, glob and control characters), a leading "-" or space replaced too,
    trailing spaces dropped, cut to MAX_NAME_BYTES of UTF-8; "_" when nothing is left."""
    out = "".join(c if c.isalnum() or c in NAME_CHARS or unicodedata.category(c).startswith("M") else "_"
                  for c in unicodedata.normalize("NFC", text))
    out = out.encode("utf-8")[:MAX_NAME_BYTES].decode("utf-8", "ignore").rstrip(" ")
    stripped = out.lstrip("- ")
    return "_" * (len(out) - len(stripped)) + stripped or "_"


def check_name(name: str) -> str:
    """ValueError unless `name` has the form output_names gives (every writer of outputs checks it)."""
    plain, mark, digest = name.partition(HASH_MARK)
    hashed = len(digest) == 8 and all(c in "0123456789abcdef" for c in digest)
    if not plain or safe_name(plain) != plain or (mark and not hashed):
        raise ValueError(f"output name {name!r}: not one output_names gives")
    return name


def output_names(paths: Sequence[Path], root: Optional[Path]) -> Dict[Path, str]:
    """A unique, safe output name per image: its path under `root` (else its file name) without suffix,
    folders joined by "__" (a flat folder of plain names gives amg.py's names: the file name without its
    suffix), made safe by safe_name. A name that safe_name changed, a reserved one (RESERVED_NAMES), and
    names equal up to case (name_key) get "~" and 8 hex digits of a hash of the image's path (under
    `root`, else as given): stable from run to run, so that a rerun finds its outputs."""
    plain: Dict[Path, Tuple[str, str, bool]] = {}
    for p in paths:
        p = Path(p)
        rel = p.relative_to(root) if root is not None and p.is_relative_to(root) else None
        parts = rel.parts if rel is not None else (p.name,)
        suffix = PurePosixPath(parts[-1]).suffix
        text = "__".join(parts[:-1] + (parts[-1][: len(parts[-1]) - len(suffix)],))
        name = safe_name(text)
        plain[p] = (name, (rel or p).as_posix(), name != text or name_key(name) in RESERVED_NAMES)
    count: Dict[str, int] = {}
    for name, _, _ in plain.values():
        count[name_key(name)] = count.get(name_key(name), 0) + 1
    names: Dict[Path, str] = {}
    seen: Dict[str, Path] = {}
    for p, (name, source, changed) in plain.items():
        if changed or count[name_key(name)] > 1:
            digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            name = f"{name}{HASH_MARK}{digest}"
        if name_key(name) in seen:  # one readable part and one 32-bit hash: vanishingly rare
            raise ValueError(f"images {seen[name_key(name)]} and {p} would both be written as {name!r}; rename one")
        seen[name_key(name)] = p
        names[p] = name
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
    check_name(name)
    return out_dir / (name if mode == "binary_mask" else f"{name}.json")


def overlay_path(out_dir: Path, name: str) -> Path:
    """Where --overlay draws an image's masks: NAME.overlay.png beside its output."""
    return out_dir / f"{check_name(name)}.overlay.png"


def is_complete(out_dir: Path, name: str, mode: str) -> bool:
    """Outputs only ever appear by a rename of a complete temporary, so existing means complete."""
    target = output_path(out_dir, name, mode)
    return (target / "metadata.csv").is_file() if mode == "binary_mask" else target.is_file()


def existing_output(target: Path, mode: str) -> Optional[int]:
    """The mask count of a complete output at `target`, None when nothing is there. ValueError when
    something else is, or an output folder holds other files: amg never replaces or deletes what it did not
    write."""
    if not target.exists() and not target.is_symlink():
        return None
    count = _output_count(target, mode)
    if count is None:
        raise ValueError(f"{target} exists and is not an output of sam-sparse amg ({mode}); it is left as it is: "
                         "move it away or choose another --out")
    if mode == "binary_mask":
        ours = {"metadata.csv"} | {f"{i}.png" for i in range(count)}
        others = sorted(e.name for e in os.scandir(target) if e.name not in ours)
        if others:  # replacing the folder would delete them
            raise ValueError(f"{target} holds files sam-sparse amg did not write ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); it is left as it is: move them away or "
                             "choose another --out")
    return count


def _output_count(target: Path, mode: str) -> Optional[int]:
    """The mask count of what amg writes in `mode`, when `target` is that; else None."""
    try:
        if mode == "binary_mask" and target.is_dir() and not target.is_symlink():
            rows = (target / "metadata.csv").read_text().splitlines()
            if rows and rows[0] == METADATA_HEADER:
                return len(rows) - 1
        elif mode == "coco_rle" and target.is_file() and not target.is_symlink():
            masks = json.loads(target.read_text())
            if isinstance(masks, list) and all(isinstance(m, dict) and "segmentation" in m for m in masks):
                return len(masks)
    except (OSError, ValueError):
        pass
    return None


OVERLAY_SOFTWARE = "sam-sparse amg"  # the PNG text chunk "Software" of the overlays amg writes


def check_overlay(path: Path) -> None:
    """ValueError when an overlay at `path` exists that amg did not write (no Software chunk of ours):
    amg never replaces a file it did not write."""
    from PIL import Image

    if not path.exists() and not path.is_symlink():
        return
    try:
        with Image.open(path) as im:
            if path.is_file() and not path.is_symlink() and getattr(im, "text", {}).get("Software") == OVERLAY_SOFTWARE:
                return
    except Exception:
        pass
    raise ValueError(f"{path} exists and is not an overlay sam-sparse amg wrote; it is left as it is: move it away "
                     "or choose another --out")


def remove_partial(out_dir: Path, name: str) -> None:
    """Temporaries an interrupted run left for this image: .NAME.tmp-PID (its folder), .NAME.tmp-X.json
    and .NAME.overlay.tmp-X.png (atomic_path's), matched exactly (no other name can match: names hold no
    dot)."""
    own = re.compile(re.escape(f".{check_name(name)}") + r"(\.overlay|\.old)?" + re.escape(TMP_MARK) + r"[A-Za-z0-9_]+(\.json|\.png)?")
    for entry in os.scandir(out_dir):
        if own.fullmatch(entry.name):
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)


def write_binary_masks(masks: List[dict], folder: Path) -> None:
    """amg.py's binary_mask layout: {i}.png (0/255) per mask and metadata.csv, in a folder renamed into
    place when complete. An earlier output there (--overwrite) is moved aside first and removed last."""
    from PIL import Image

    name = check_name(folder.name)
    tmp = folder.parent / f".{name}{TMP_MARK}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    rows = [METADATA_HEADER]
    for i, m in enumerate(masks):
        Image.fromarray(m["segmentation"].astype(np.uint8) * 255).save(tmp / f"{i}.png",
                                                                       compress_level=PNG_COMPRESS_LEVEL)
        rows.append(",".join([str(i), str(m["area"]), *map(str, m["bbox"]), *map(str, m["point_coords"][0]),
                              str(m["predicted_iou"]), str(m["stability_score"]), *map(str, m["crop_box"])]))
    (tmp / "metadata.csv").write_text("\n".join(rows))
    aside = None
    if existing_output(folder, "binary_mask") is not None:
        aside = folder.parent / f".{name}.old{TMP_MARK}{os.getpid()}"
        os.replace(folder, aside)
    os.replace(tmp, folder)
    if aside is not None:
        shutil.rmtree(aside)


def write_rle_json(masks: List[dict], path: Path) -> None:
    """amg.py's coco_rle layout: the generator's records, segmentation as COCO RLE, one JSON per image."""
    check_name(path.name[: -len(".json")])
    existing_output(path, "coco_rle")  # never over a file amg did not write
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
    overlay: bool = False,
    on_record: Optional[Callable[[dict], None]] = None,
    mode: str = "exact",
) -> List[dict]:
    """Generate every image's masks (maskgen.AutomaticMaskGenerator in `mode`: "exact" or "fast"), writing
    them under `out_dir`.

    batch_images: images per image-encoder forward (the next N images still to do, in order); used only
    with settings.crop_n_layers == 0, else every image (and crop) is embedded on its own. With 1 (the
    default) images stream through generator.generate_many: the next ones are read and resized on a worker
    thread while the device works on this one.
    overlay: also draw each image's masks over it, NAME.overlay.png (an image is complete when both exist).
    Returns one record per image, in the order of `paths`: image, output, status ("done", "skipped":
    complete from an earlier run, "failed"), masks, seconds (its own work plus an equal share of its
    batch's encoder forward; streamed: the wall time from the previous image's generation end to this
    one's, plus the writing of its outputs), error. Every
    per-image failure (a missing, unreadable or corrupt image, one too large for PIL, an error while
    generating its masks, something not written by amg where its output goes) is recorded as failed and
    the run goes on. progress(masks) and on_record(record) are called as each image's record is final.
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

    def finish(record: dict) -> None:
        record["seconds"] = round(record["seconds"], 3)
        if progress is not None:
            progress(record["masks"])
        if on_record is not None:
            on_record(record)

    records: List[dict] = []
    pending: List[Tuple[Path, dict]] = []  # images to do, waiting for a full batch
    for path in paths:
        name = names[path]
        target = output_path(out_dir, name, output_mode)
        record = dict(image=str(path), output=str(target), status="done", masks=0, seconds=0.0, error=None)
        if overlay:
            record["overlay"] = str(overlay_path(out_dir, name))
        records.append(record)
        try:
            count = existing_output(target, output_mode)
            if overlay:
                check_overlay(overlay_path(out_dir, name))
            if overlay and count is not None and not overlay_path(out_dir, name).is_file():
                count = None  # the output is there, its picture is not: redo both
        except ValueError as e:
            record.update(status="failed", error=str(e))
            finish(record)
            continue
        if count is not None and not overwrite:
            record.update(status="skipped", masks=count)
            finish(record)
            continue
        remove_partial(out_dir, name)
        pending.append((path, record))
        if batched and len(pending) == batch_images:
            _run_batch(generator, pending, output_mode, overlay, finish)
            pending = []
    if pending:
        (_run_batch if batched else _run_streamed)(generator, pending, output_mode, overlay, finish)
    return records


def read_image(path: Path) -> np.ndarray:
    """An image for amg: load_image, with what is wrong when the file is not there."""
    from .segment import load_image

    if path.is_symlink() and not path.exists():
        raise ValueError(f"image {path}: a broken symbolic link (to {os.readlink(path)})")
    if path.is_dir():
        raise ValueError(f"image {path}: is a folder")
    if not path.exists():
        raise ValueError(f"image {path}: no such file")
    return load_image(path)


def _error(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _write(generator_records: List[dict], image: np.ndarray, record: dict, output_mode: str, overlay: bool) -> None:
    """One image's outputs (and overlay), recorded in `record`."""
    if output_mode == "binary_mask":
        write_binary_masks(generator_records, Path(record["output"]))
    else:
        write_rle_json(generator_records, Path(record["output"]))
    record["masks"] = len(generator_records)
    if overlay:
        write_overlay(Path(record["overlay"]), image, generator_records)


def _run_batch(generator, jobs: List[Tuple[Path, dict]], output_mode: str, overlay: bool,
               finish: Callable[[dict], None]) -> None:
    """Masks for each (path, record) in `jobs`, filling the record, with one encoder forward for all
    readable images of `jobs`. Any Exception of one image (not KeyboardInterrupt) fails that image alone."""
    loaded = []  # (image, record) of the readable images
    for path, record in jobs:
        t0 = time.perf_counter()
        try:
            loaded.append((read_image(path), record))
        except Exception as e:  # missing, unreadable, corrupt, too large: recorded, the batch goes on
            record.update(status="failed", error=_error(e))
        record["seconds"] += time.perf_counter() - t0
    if loaded:
        t0 = time.perf_counter()
        try:
            embeddings = generator.embed_images([image for image, _ in loaded])
        except Exception as e:  # out of memory, say: the batch fails, the run goes on
            for _, record in loaded:
                record.update(status="failed", error=f"image encoder, batch of {len(loaded)}: {_error(e)}")
            loaded = []
        share = (time.perf_counter() - t0) / max(1, len(loaded))
    for i, (image, record) in enumerate(loaded):
        t0 = time.perf_counter()
        record["seconds"] += share
        try:
            _write(generator.generate(image, embedding=embeddings[i]), image, record, output_mode, overlay)
        except Exception as e:  # a full disk, an output path taken by something else, ...
            record.update(status="failed", error=_error(e))
        record["seconds"] += time.perf_counter() - t0
    for _, record in jobs:  # in input order, failed ones included
        finish(record)


def _run_streamed(generator, jobs: List[Tuple[Path, dict]], output_mode: str, overlay: bool,
                  finish: Callable[[dict], None]) -> None:
    """Masks for each (path, record) in `jobs`, in order, through generator.generate_many: the next images
    are read and resized on a worker thread while the device works on this one, and each image's outputs
    are written on another thread (up to WRITES_AHEAD images behind). Records are finished in order, each
    once its outputs are written. An image that cannot be read, or whose generation or outputs fail (any
    Exception, not KeyboardInterrupt), fails alone; an error inside a generation ends that stream, and a new
    one takes the images after it. `seconds`: the wall time from the previous image's generation end to
    this one's, plus the writing of its outputs."""
    images: Dict[Path, np.ndarray] = {}  # the images in flight, for their overlays
    writing: Deque[Tuple[dict, Optional[Future]]] = deque()

    def load(job):
        image = read_image(job[0])
        if overlay:
            images[job[0]] = image
        return image

    def write(records, image, record) -> float:
        """On the writer thread: the outputs, and the seconds they took (added to the record when settled)."""
        t0 = time.perf_counter()
        _write(records, image, record, output_mode, overlay)
        return time.perf_counter() - t0

    def settle(keep: int) -> None:
        """Finish the records in order until at most `keep` images are still being written."""
        while len(writing) > keep:
            record, future = writing.popleft()
            if future is not None:
                try:
                    record["seconds"] += future.result()
                except Exception as e:  # a full disk, an output path taken by something else, ...
                    record.update(status="failed", error=_error(e))
            finish(record)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sam-sparse-amg-write") as writer:
        remaining = list(jobs)
        try:
            while remaining:
                stream, rest, t0 = generator.generate_many(remaining, load=load), [], time.perf_counter()
                for i, (path, record) in enumerate(remaining):
                    result, future = None, None
                    try:
                        result = next(stream)  # an error inside this image's generation is raised here
                        if result.error is not None:
                            raise result.error
                        future = writer.submit(write, result.records, images.get(path), record)
                    except Exception as e:  # unreadable, corrupt, out of memory, ...
                        record.update(status="failed", error=_error(e))
                    images.pop(path, None)
                    record["seconds"] += time.perf_counter() - t0
                    writing.append((record, future))
                    settle(WRITES_AHEAD)
                    t0 = time.perf_counter()
                    if result is None:  # the generation raised: this stream is over, a new one takes the rest
                        rest = remaining[i + 1:]
                        break
                remaining = rest
        finally:  # also on Ctrl-C: the outputs being written are waited for and recorded
            settle(0)


def write_overlay(path: Path, image: np.ndarray, masks: List[dict]) -> None:
    """The image with every mask tinted and outlined (segment's overlay), largest first so that small
    masks stay visible on top; PNG, written atomically."""
    from .segment import save_overlay

    check_name(path.name[: -len(".overlay.png")])
    check_overlay(path)
    segs = []
    for m in sorted(masks, key=lambda m: -m["area"]):
        seg = m["segmentation"]
        if isinstance(seg, dict):  # coco_rle mode: a COCO RLE
            from pycocotools import mask as mask_utils

            seg = mask_utils.decode(dict(seg, counts=seg["counts"].encode()) if isinstance(seg["counts"], str) else seg)
        segs.append(np.asarray(seg, dtype=bool))
    stack = np.stack(segs) if segs else np.zeros((0,) + image.shape[:2], dtype=bool)
    save_overlay(path, image, stack, text={"Software": OVERLAY_SOFTWARE})


MANIFEST_SECONDS = 1.0  # the shortest time between two writes of the manifest while a run goes


def pending_record(path: Path, output: Path) -> dict:
    """An image's manifest record before its turn."""
    return dict(image=str(path), output=str(output), status="pending", masks=0, seconds=0.0, error=None)


def write_manifest(path: Path, run: dict, records: Sequence[dict], finished: bool = True) -> None:
    """manifest.json: the run (model, policy, version, arguments), whether it finished, and one record per
    image, sorted; written atomically, so a reader (or an interrupted run) always finds a whole file."""
    body = dict(run, finished=finished, images=sorted(records, key=lambda r: r["image"]))
    body["summary"] = {s: sum(r["status"] == s for r in records) for s in ("done", "skipped", "failed", "pending")}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(body, indent=1))


def is_manifest(path: Path) -> bool:
    """Whether `path` is a manifest amg wrote (so a new run may replace it)."""
    try:
        return json.loads(Path(path).read_text()).get("tool") == "sam-sparse amg"
    except (OSError, ValueError, AttributeError):
        return False
