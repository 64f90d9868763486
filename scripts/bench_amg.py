"""Automatic mask generation benchmark: segment-anything's SamAutomaticMaskGenerator unpatched vs
sam-sparse dense vs a sparse policy, on real photos at their own sizes.

For each model (vit_b and vit_h with random weights, their rel-pos tables randomized because SAM
initializes them to zero; mobile_sam with its released weights) and each configuration
  unpatched       segment-anything as is (its SamAutomaticMaskGenerator)
  unpatched+rle   the same model with sam_sparse.amg.MaskGenerator (faster RLE helpers, same output)
  dense           sam_sparse.patch_sam(model, "dense"), MaskGenerator: what `sam-sparse amg` runs
  <policy>        sam_sparse.patch_sam(model, --policy), MaskGenerator  (default local2d-30)
it measures images/s and masks/s of generator.generate(image) over the same photos (decoded beforehand,
so file reading is not timed), where the time goes per image (encoder: predictor.set_image, its
preprocessing included; decoder: the predictor.predict_torch calls; post: the rest of generate, i.e.
stability scores, NMS, RLE, mask records), and how far each patched configuration's mask set agrees
with the unpatched one (for each unpatched mask, its best IoU among ours: the share >= 0.9 and the
median). The three configurations are three copies of one model; they run one after another on each
image, in an order rotated per image, so that clock drift hits all alike. Each is warmed up on the first
image before timing (the kernel autotunes on its first call). Then sam-sparse amg's job function
(sam_sparse.amg.generate_masks: read, generate, write) is timed with --batch-images 1 vs 4 on the dense
configuration of one model.

Results go to --out as bench_amg.json and bench_amg.md, rewritten after every image, and the table is
printed at the end.

Random weights make a degenerate generator: at SAM's thresholds (predicted IoU 0.88, stability 0.95)
hardly any mask survives, so for vit_b / vit_h the encoder and decoder times are real but masks/s,
post-processing (which scales with the surviving masks) and the agreement are not; --checkpoint
vit_b=FILE uses real weights where a machine has them. MobileSAM's TinyViT encoder is not patched
(only its mask decoder is), so there a sparse policy changes the decoder only.

    python scripts/bench_amg.py --export-photos photos/     # here, where scikit-image's data is
    python scripts/bench_amg.py --images-dir photos/ --mobile-sam-checkpoint mobile_sam.pt --out $OUT
    python scripts/bench_amg.py --points-per-side 4 --images 2 --models mobile_sam --device cpu --out /tmp/b
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# scikit-image's offline photos (colour or grey, natural scenes or microscopy); left out as synthetic or
# binary: checkerboard, colorwheel, horse, logo, shepp_logan_phantom; lfw_subset (25 px faces); cat
# (chelsea again); the ones that need pooch to download.
PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
          "text")


def export_photos(folder: Path) -> list:
    """Save every photo of PHOTOS (and both stereo_motorcycle views) that loads offline as folder/NAME.png.
    Returns the paths written."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in PHOTOS:
        try:
            arrays[name] = getattr(data, name)()
        except Exception as e:  # a file this scikit-image install does not have
            print(f"skip {name}: {type(e).__name__}: {str(e)[:80]}", file=sys.stderr)
    try:
        arrays["motorcycle_left"], arrays["motorcycle_right"], _ = data.stereo_motorcycle()
    except Exception as e:
        print(f"skip stereo_motorcycle: {e}", file=sys.stderr)
    written = []
    for name, img in arrays.items():
        Image.fromarray(img).save(folder / f"{name}.png")
        written.append(folder / f"{name}.png")
    return written


# ---------------------------------------------------------------------------------------------------
# Models and configurations
# ---------------------------------------------------------------------------------------------------


def build_model(name: str, args, device: torch.device):
    """vit_b / vit_h: random weights, seeded, rel_pos_h/w ~ N(0, rel_pos_std), unless --checkpoint names
    a file for it; mobile_sam: its released weights."""
    from sam_sparse import build_sam, fetch_mobile_sam

    torch.manual_seed(args.seed)
    if name in args.checkpoint:
        model = build_sam(name, args.checkpoint[name])
    elif name == "mobile_sam":
        model = build_sam("mobile_sam", args.mobile_sam_checkpoint or fetch_mobile_sam())
    else:
        model = build_sam(name)
        with torch.no_grad():  # SAM zero-initializes these: randomize so the rel-pos bias is real
            for n, p in model.named_parameters():
                if n.endswith(("rel_pos_h", "rel_pos_w")):
                    p.normal_(0, args.rel_pos_std)
    model = model.to(device).eval()
    if args.dtype == "bf16":
        # Only the image encoder: SAM's predictor runs the prompt encoder and decoder on float32 points.
        enc = model.image_encoder.to(torch.bfloat16)
        enc.register_forward_pre_hook(lambda m, a: (a[0].to(torch.bfloat16),))
        enc.register_forward_hook(lambda m, a, out: out.float())
    return model


def configurations(model, policy: str) -> dict:
    """{config name: (model, notes, sam-sparse's generator?)}: the model itself unpatched with
    segment-anything's generator; the same with sam-sparse's (MaskGenerator: its RLE helpers, same
    output), which separates what post-processing gains from what attention gains; and patched copies
    with sam-sparse's generator, as `sam-sparse amg` runs them."""
    from sam_sparse import patch_sam

    configs = {"unpatched": (model, [], False), "unpatched+rle": (model, [], True)}
    for name in ("dense", policy):
        copy_ = copy.deepcopy(model)
        configs[name] = (copy_, list(patch_sam(copy_, name).notes), True)
    return configs


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedGenerator:
    """A SamAutomaticMaskGenerator whose predictor's set_image and predict_torch add their seconds to
    self.seconds["encoder"] / ["decoder"], with CUDA synchronized around each call."""

    def __init__(self, model, args, device: torch.device, ours: bool):
        from segment_anything import SamAutomaticMaskGenerator

        from sam_sparse.amg import MaskGenerator

        self.device = device
        self.generator = (MaskGenerator if ours else SamAutomaticMaskGenerator)(
            model, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh)
        self.seconds = {}
        predictor = self.generator.predictor
        predictor.set_image = self._timed(predictor.set_image, "encoder")
        predictor.predict_torch = self._timed(predictor.predict_torch, "decoder")

    def _timed(self, fn, key):
        def call(*a, **kw):
            sync(self.device)
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync(self.device)
            self.seconds[key] += time.perf_counter() - t
            return out

        return call

    def generate(self, image: np.ndarray):
        """(masks, {"total", "encoder", "decoder", "post"} seconds) for one HxWx3 uint8 image."""
        self.seconds = {"encoder": 0.0, "decoder": 0.0}
        sync(self.device)
        t = time.perf_counter()
        with torch.inference_mode():
            masks = self.generator.generate(image)
        sync(self.device)
        s = dict(self.seconds, total=time.perf_counter() - t)
        s["post"] = s["total"] - s["encoder"] - s["decoder"]
        return masks, s


def best_ious(reference: list, ours: list, device: torch.device) -> list:
    """For each reference mask (HxW bool), its best IoU among `ours` (0 when ours is empty)."""
    if not reference or not ours:
        return [0.0] * len(reference)
    a = torch.from_numpy(np.stack(reference)).to(device).flatten(1)  # (n, H*W) bool
    b = torch.from_numpy(np.stack(ours)).to(device).flatten(1)  # (m, H*W)
    inter = torch.zeros(len(a), len(b), dtype=torch.float64, device=device)
    step = 1 << 20  # pixels per chunk: bounds the float copies; each chunk's counts are exact in float32
    for i in range(0, a.shape[1], step):
        inter += (a[:, i:i + step].float() @ b[:, i:i + step].float().T).double()
    union = a.sum(1, dtype=torch.float64)[:, None] + b.sum(1, dtype=torch.float64)[None] - inter
    return (inter / union.clamp(min=1)).max(1).values.tolist()


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def summarize(rows: list) -> list:
    """One line per (model, config) from the per-image rows: throughput, ms per image, agreement."""
    lines = []
    for key in dict.fromkeys((r["model"], r["config"]) for r in rows):
        rs = [r for r in rows if (r["model"], r["config"]) == key]
        total = sum(r["seconds"]["total"] for r in rs)
        ious = [x for r in rs for x in r.get("best_ious", [])]
        line = dict(model=key[0], config=key[1], images=len(rs), masks=sum(r["masks"] for r in rs),
                    images_per_s=len(rs) / total, masks_per_s=sum(r["masks"] for r in rs) / total)
        for part in ("encoder", "decoder", "post"):
            line[f"{part}_ms"] = 1e3 * statistics.mean(r["seconds"][part] for r in rs)
        if key[1] != "unpatched":
            line["agree_0.9"] = sum(x >= 0.9 for x in ious) / len(ious) if ious else None
            line["median_iou"] = statistics.median(ious) if ious else None
        lines.append(line)
    return lines


def markdown(meta: dict, summary: list, batch: list) -> str:
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    out = [f"AMG, {meta['gpu']}, {meta['dtype']}, {meta['points_per_side']} points per side, {meta['images']} photos "
           f"at their own sizes; ms per image are means (encoder = set_image, decoder = predict_torch, post = the "
           "rest of generate); agreement: for each unpatched mask, the best IoU among the configuration's masks. "
           "Weights: " + ", ".join(f"{m} {w}" for m, w in meta["weights"].items()) + ".",
           "",
           "| model | config | images/s | masks/s | masks | encoder ms | decoder ms | post ms | IoU >= 0.9 | median IoU |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        out.append(f"| {s['model']} | {s['config']} | {s['images_per_s']:.2f} | {s['masks_per_s']:.1f} | {s['masks']} "
                   f"| {s['encoder_ms']:.1f} | {s['decoder_ms']:.1f} | {s['post_ms']:.1f} "
                   f"| {fmt(s.get('agree_0.9'), '.1%')} | {fmt(s.get('median_iou'), '.4f')} |")
    if batch:
        out += ["", "sam-sparse amg's job function (read, generate, write), dense:", "",
                "| model | batch images | images/s | masks/s | same outputs as batch 1 |", "|---|---:|---:|---:|---|"]
        for b in batch:
            out.append(f"| {b['model']} | {b['batch_images']} | {b['images_per_s']:.2f} | {b['masks_per_s']:.1f} "
                       f"| {b.get('same_as_batch_1', '')} |")
    return "\n".join(out)


def save(out: Path, meta: dict, rows: list, batch: list) -> str:
    summary = summarize(rows)
    table = markdown(meta, summary, batch)
    (out / "bench_amg.json").write_text(json.dumps(dict(meta=meta, summary=summary, batch=batch, rows=rows), indent=1))
    (out / "bench_amg.md").write_text(table + "\n")
    return table


def git_commit() -> str:
    import os

    if os.environ.get("SAM_SPARSE_COMMIT"):
        return os.environ["SAM_SPARSE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------------
# The two measurements
# ---------------------------------------------------------------------------------------------------


def bench_model(name: str, images: dict, args, device, rows: list, on_image) -> None:
    """Every configuration of one model on every image; a row per (image, config) appended to rows."""
    configs = configurations(build_model(name, args, device), args.policy)
    generators = {c: TimedGenerator(m, args, device, ours) for c, (m, _, ours) in configs.items()}
    first = next(iter(images.values()))
    for c, g in generators.items():
        g.generate(first)  # warm-up: kernel autotuning, allocator, cuDNN choices
    order = list(generators)
    for i, (path, image) in enumerate(images.items()):
        masks = {}
        for c in order[i % len(order):] + order[:i % len(order)]:  # rotated: no config always goes first
            masks[c], seconds = generators[c].generate(image)
            rows.append(dict(model=name, config=c, image=path.name, size=list(image.shape[:2]), masks=len(masks[c]),
                             seconds=seconds, notes=configs[c][1]))
        reference = [m["segmentation"] for m in masks["unpatched"]]
        for r in rows[-len(order):]:
            if r["config"] != "unpatched":
                r["best_ious"] = best_ious(reference, [m["segmentation"] for m in masks[r["config"]]], device)
        on_image()
    del configs, generators
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_batch_images(name: str, paths: list, args, device) -> list:
    """sam_sparse.amg.generate_masks (the `sam-sparse amg` job) on the dense model, batch 1 vs
    args.batch_images, alternating, args.repeats times; outputs compared with batch 1's."""
    from sam_sparse import patch_sam
    from sam_sparse.amg import GeneratorSettings, generate_masks

    model = build_model(name, args, device)
    patch_sam(model, "dense")
    settings = GeneratorSettings(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                                 pred_iou_thresh=args.pred_iou_thresh,
                                 stability_score_thresh=args.stability_score_thresh)
    sizes = (1, args.batch_images)
    seconds, masks = {b: 0.0 for b in sizes}, {}
    with tempfile.TemporaryDirectory(prefix="bench-amg-") as tmp:
        outs = {b: Path(tmp) / f"batch{b}" for b in sizes}
        for b in sizes:
            outs[b].mkdir()
            if device.type == "cuda":  # warm-up: the kernel autotunes for the batch-b shapes on first use
                generate_masks(model, paths[:b], outs[b], settings, overwrite=True, batch_images=b)
        for _ in range(args.repeats):
            for b in sizes:
                sync(device)
                t = time.perf_counter()
                records = generate_masks(model, paths, outs[b], settings, overwrite=True, batch_images=b)
                sync(device)
                seconds[b] += time.perf_counter() - t
                masks[b] = sum(r["masks"] for r in records)
        csv = lambda b, p: (outs[b] / p.stem / "metadata.csv").read_bytes()  # noqa: E731
        same = sum(csv(1, p) == csv(sizes[1], p) for p in paths)
    n = len(paths) * args.repeats
    return [dict(model=name, config="dense", batch_images=b, images=n, seconds=seconds[b], images_per_s=n / seconds[b],
                 masks_per_s=masks[b] * args.repeats / seconds[b],
                 same_as_batch_1=f"{same}/{len(paths)} images" if b > 1 else "") for b in sizes]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export-photos", type=Path, metavar="DIR",
                    help="only save scikit-image's photos as PNGs into DIR (to carry to a machine without them)")
    ap.add_argument("--images-dir", type=Path, help="photos (default: scikit-image's, exported to a temp dir)")
    ap.add_argument("--images", type=int, default=None, help="use only the first N photos (sorted by path)")
    ap.add_argument("--models", default="vit_b,vit_h,mobile_sam", help="comma list of vit_b, vit_l, vit_h, mobile_sam")
    ap.add_argument("--mobile-sam-checkpoint", type=Path, help="MobileSAM's weights (default: fetch_mobile_sam())")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=FILE",
                    help="real weights instead of random ones (repeatable), e.g. vit_b=sam_vit_b_01ec64.pth")
    ap.add_argument("--policy", default="local2d-30", help="the sparse policy (name or YAML path)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                    help="bf16: the image encoder only (SAM's prompt encoder and decoder stay float32)")
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ap.add_argument("--stability-score-thresh", type=float, default=0.95)
    ap.add_argument("--rel-pos-std", type=float, default=0.02, help="std of the random rel-pos tables (vit_*)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-images", type=int, default=4, help="batch timed against 1 in the job function; 0: skip")
    ap.add_argument("--batch-model", default=None, help="model for the batch timing (default: the first of --models)")
    ap.add_argument("--repeats", type=int, default=1, help="job-function passes per batch size")
    ap.add_argument("--device", default=None, help="default cuda if available, else cpu")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for bench_amg.json and bench_amg.md")
    args = ap.parse_args(argv)
    if any("=" not in c for c in args.checkpoint):
        ap.error("--checkpoint: expected MODEL=FILE")
    args.checkpoint = dict(c.split("=", 1) for c in args.checkpoint)

    if args.export_photos:
        written = export_photos(args.export_photos)
        print(f"wrote {len(written)} photos to {args.export_photos}")
        return
    from sam_sparse import __version__
    from sam_sparse.amg import find_images
    from sam_sparse.segment import load_image

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tmp = None
    if args.images_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-amg-photos-")
        args.images_dir = Path(tmp.name)
        export_photos(args.images_dir)
    paths = find_images(args.images_dir)[:args.images]
    images = {p: load_image(p) for p in paths}
    args.out.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), sam_sparse=__version__, commit=git_commit(),
                torch=torch.__version__, python=platform.python_version(), device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                dtype=args.dtype, points_per_side=args.points_per_side, images=len(paths), policy=args.policy,
                weights={m: args.checkpoint.get(m, "released" if m == "mobile_sam" else "random") for m in models},
                argv=sys.argv[1:], photos=[f"{p.name} {im.shape[1]}x{im.shape[0]}" for p, im in images.items()])
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    print(json.dumps({k: v for k, v in meta.items() if k != "photos"}), flush=True)

    rows, batch = [], []
    t0 = time.time()
    for name in models:
        bench_model(name, images, args, device, rows, on_image=lambda: save(args.out, meta, rows, batch))
        print(f"{name}: done after {time.time() - t0:.0f} s", flush=True)
    if args.batch_images > 1:
        batch = bench_batch_images(args.batch_model or models[0], paths, args, device)
    meta["seconds"] = round(time.time() - t0, 1)
    print(save(args.out, meta, rows, batch))
    print(f"wrote {args.out / 'bench_amg.json'} and {args.out / 'bench_amg.md'}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
