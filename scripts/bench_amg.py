"""Automatic mask generation and SamPredictor.predict, before and after sam_sparse.maskgen, in one run.

Sections (--only picks some; each is wrapped so that a failure is recorded and the next one runs; each
appends its rows to $OUT/bench_amg.jsonl and its table to $OUT/bench_amg.md as soon as it finishes; the exit
status is 1 when any section failed).
Expected times on one H200, full run (--quick: about a third):

  amg        ~60 s  MobileSAM, released weights, patched with `dense` (what `sam-sparse amg` runs), 20
                    photos at their own sizes, SAM's defaults (32 x 32 points, 64 per batch, no crops):
                    segment-anything's SamAutomaticMaskGenerator on that model vs sam_sparse.maskgen's
                    exact and fast modes and three fast variants (low-res stability; the model's decoder,
                    the fast mode's until run 44; bf16 decoder). Every
                    config on every photo in an order rotated per photo, each warmed up first; images/s
                    (per-image calls, plus exact / fast streamed through generate_many, which reads
                    ahead on a thread); agreement with segment-anything's records: the share of its masks
                    whose best IoU among the config's is >= 0.9, the median best IoU, and the photos
                    whose records are identical (masks, every field, its type, the order).
  breakdown  ~20 s  where the time goes, per image, on 5 photos: segment-anything (encoder = set_image,
                    decoder = predict_torch, which upsamples every mask, post = the rest: stability,
                    boxes, RLE, NMS, records) vs exact / fast with the model's decoder / fast with the
                    model's upsampling / fast (prepare, encoder, decoder, upsample, post, rle, host), each
                    stage timed with a device sync at its end.
  crops      ~90 s  the amg rows with crop_n_layers=1 on --crop-images photos (default 10; 20 takes
                    about twice as long): segment-anything, exact, fast.
  vit        ~40 s  vit_b and vit_h with random weights (rel-pos tables randomized), patched `dense`: no
                    mask passes SAM's thresholds, so this times the encoder and decoder per image
                    (segment-anything vs exact vs fast with the model's decoder vs fast), on 3 photos.
                    --vit-models also takes SAM 2.1 types (sam2.1_hiera_t / s / b+ / l: sam2's builder,
                    random weights): the reference is then sam2's SAM2AutomaticMaskGenerator (encoder =
                    its predictor's set_image, decoder = its _predict), with SAM 2's generator settings.
  predictor  ~15 s  vit_b (random weights), bf16 encoder + set_image_on_device, a 1500 x 2250 photo (the
                    coffee photo upscaled), one point: SamPredictor.predict vs DevicePredictor (eager,
                    with a CUDA graph, and with its set_image replaying the encoder from a CUDA graph
                    too): set_image + predict and predict alone (median ms), and whether every result
                    array equals SamPredictor.predict's (on this photo, and on another one set
                    afterwards) and the graphed encoder's features equal the encoder's.
  compile    ~90 s  (only with --compile or --only compile) fast mode with the decoder compiled
                    (torch.compile, default mode): first-call seconds, images/s and agreement on the amg
                    photos (segment-anything's records from the amg section, or computed here, ~20 s).
  variants   ~90 s  (only with --only variants) the amg rows for the configs in --variants (fast mode, with
                    the model's decoder as the fast mode had it until run 44, with bf16 and compiled
                    decoders, ...), each against
                    segment-anything in the same run (run 41 named the fast mode "fast, no prefilter": it
                    has had none since).
  profile    ~50 s  (only with --only profile) torch.profiler over one generate() per config (exact, fast,
                    fast with the model's decoder or the model's upsampling) on the --breakdown-images
                    photos: wall vs GPU ms per image and the top kernels.
  cli        ~90 s  (only with --only cli) `sam-sparse amg` as a user runs it, exact and fast, on the photos
                    saved as PNG files, after a first run that fills Triton's kernel cache: wall seconds on
                    one photo and on all, the steady images/s between the two (start-up left out), the
                    median of the manifest's per-image seconds, and the rate with start-up.

Photos (offline, reproducible): scikit-image's data photos that load without a download (18 names in
PHOTOS plus both stereo_motorcycle views), grey ones as RGB, at their own sizes; when fewer load, the
set is filled with deterministic variants (centre crops to 3/4, 1.5x bicubic upscales). --images-dir
reads photos from files instead (sorted by path); --export-photos writes the built set as PNGs.

    python scripts/bench_amg.py --out $OUT                        # GPU, everything but compile
    python scripts/bench_amg.py --out $OUT --compile              # and the compiled decoder
    python scripts/bench_amg.py --out $OUT --only vit --vit-models sam2.1_hiera_b+,sam2.1_hiera_l   # SAM 2
    python scripts/bench_amg.py --out /tmp/b --device cpu --quick # CPU smoke run: 1 small photo, 4 x 4 points,
                                                                  # segment-anything / exact / fast only
                                                                  # (5.5 min on 2 shared CPU cores)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import wall_ms  # noqa: E402

PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "microaneurysms", "moon", "page", "retina", "rocket",
          "text")


# ---------------------------------------------------------------------------------------------------
# Photos
# ---------------------------------------------------------------------------------------------------


def photo_set(n: int, max_side: int = 0) -> dict:
    """{name: HxWx3 uint8} for n photos, built offline and in a fixed order (module docstring);
    max_side > 0 shrinks each so its long side is at most that."""
    from PIL import Image
    from skimage import data

    photos = {}
    for name in PHOTOS:
        with contextlib.suppress(Exception):  # a file this scikit-image install does not have
            photos[name] = getattr(data, name)()
    with contextlib.suppress(Exception):
        photos["motorcycle_left"], photos["motorcycle_right"], _ = data.stereo_motorcycle()
    photos = {k: np.ascontiguousarray(np.repeat(v[..., None], 3, 2) if v.ndim == 2 else v[..., :3])
              for k, v in photos.items()}
    base = sorted(photos, key=lambda k: (-photos[k].size, k))
    i = 0
    while len(photos) < n and base:
        src = photos[base[i % len(base)]]
        h, w = src.shape[:2]
        if i < len(base):
            photos[f"{base[i]}_crop"] = np.ascontiguousarray(src[h // 8: h - h // 8, w // 8: w - w // 8])
        else:
            k = base[i % len(base)]
            photos[f"{k}_up"] = np.asarray(Image.fromarray(src).resize((w * 3 // 2, h * 3 // 2), Image.BICUBIC))
        i += 1
    photos = dict(list(photos.items())[:n])
    if max_side:
        for k, v in photos.items():
            h, w = v.shape[:2]
            s = max_side / max(h, w)
            if s < 1:
                photos[k] = np.asarray(Image.fromarray(v).resize((max(1, round(w * s)), max(1, round(h * s)))))
    return photos


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


def build_model(name: str, args, device: torch.device):
    """mobile_sam: its released weights; vit_b / vit_h: random, seeded, rel_pos ~ N(0, 0.02) (SAM
    initializes them to zero); sam2.1_*: sam2's builder, random, seeded. Patched with `dense`, as
    `sam-sparse amg` runs them (not the random models in a CPU --quick run: on the CPU the patched encoder
    runs the block-sparse reference path, ~70 s per image for vit_b on 2 cores)."""
    from sam_sparse import build_sam, fetch_mobile_sam, patch_sam
    from sam_sparse.models import build_model as build_random

    torch.manual_seed(args.seed)
    if name == "mobile_sam":
        model = build_sam("mobile_sam", args.mobile_sam_checkpoint or fetch_mobile_sam(), device=device)
    elif name.startswith("sam2"):
        model = build_random(name).to(device)
    else:
        model = build_sam(name, device=device)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("rel_pos_h", "rel_pos_w")):
                    p.normal_(0, 0.02)
    if name == "mobile_sam" or not (args.quick and device.type != "cuda"):
        patch_sam(model, "dense")
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedReference:
    """The model family's own generator: segment-anything's SamAutomaticMaskGenerator (its predictor's
    set_image and predict_torch timed, device synced around each, when `profile`), or for a SAM 2 model
    sam2's SAM2AutomaticMaskGenerator (set_image and _predict)."""

    def __init__(self, model, device, profile=False, **settings):
        from sam_sparse.maskgen import model_family

        self.device, self.seconds = device, {}
        if model_family(model) == "sam2":
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

            self.generator, decoder = SAM2AutomaticMaskGenerator(model, **settings), "_predict"
        else:
            from segment_anything import SamAutomaticMaskGenerator

            self.generator, decoder = SamAutomaticMaskGenerator(model, **settings), "predict_torch"
        if profile:
            p = self.generator.predictor
            p.set_image = self._timed(p.set_image, "encoder")
            setattr(p, decoder, self._timed(getattr(p, decoder), "decoder"))

    def _timed(self, fn, key):
        def call(*a, **kw):
            sync(self.device)
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync(self.device)
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t
            return out

        return call

    def generate(self, image):
        self.seconds = {}
        with torch.inference_mode():
            return self.generator.generate(image)


class Pipeline:
    """sam_sparse.maskgen.AutomaticMaskGenerator with a `seconds` dict like TimedReference's."""

    def __init__(self, model, mode, profile=False, **settings):
        from sam_sparse.maskgen import AutomaticMaskGenerator

        self.generator = AutomaticMaskGenerator(model, mode, profile=profile, **settings)
        self.seconds = {}

    def generate(self, image):
        records = self.generator.generate(image)
        self.seconds = self.generator.last_seconds or {}
        return records


def configs(model, device, names, profile=False, **settings) -> dict:
    from sam_sparse.maskgen import EXACT, FAST, with_changes

    model_decoder = with_changes(FAST, decoder="model", upsample="model")  # the fast mode until run 44
    modes = {"exact": "exact", "fast": "fast",
             "fast, model decoder": model_decoder,
             "fast, model upsampling": with_changes(FAST, upsample="model"),  # the fast mode until run 47
             "exact, fused upsampling": with_changes(EXACT, upsample="fused"),
             "fast, low-res stability": with_changes(FAST, stability_on="low_res", low_res_margin=None),
             "fast, low-res prefilter": with_changes(FAST, low_res_margin=0.05),
             "fast, bf16 decoder": with_changes(FAST, decoder_dtype="bfloat16"),
             "fast, model decoder, bf16": with_changes(model_decoder, decoder_dtype="bfloat16"),
             "fast, compiled decoder": with_changes(model_decoder, compile_decoder="default"),
             "fast, bf16, compiled decoder": with_changes(model_decoder, decoder_dtype="bfloat16",
                                                          compile_decoder="default")}
    out = {}
    for name in names:
        if name == "segment-anything":
            out[name] = TimedReference(model, device, profile, **settings)
        else:
            out[name] = Pipeline(model, modes[name], profile, **settings)
    return out


# ---------------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------------


def best_ious(reference: list, ours: list, device: torch.device) -> list:
    """For each reference mask (HxW bool), its best IoU among `ours` (0 when ours is empty)."""
    if not reference or not ours:
        return [0.0] * len(reference)
    a = torch.from_numpy(np.stack(reference)).to(device).flatten(1)
    b = torch.from_numpy(np.stack(ours)).to(device).flatten(1)
    inter = torch.zeros(len(a), len(b), dtype=torch.float64, device=device)
    step = 1 << 20  # pixels per chunk: bounds the float copies; each chunk's counts are exact in float32
    for i in range(0, a.shape[1], step):
        inter += (a[:, i:i + step].float() @ b[:, i:i + step].float().T).double()
    union = a.sum(1, dtype=torch.float64)[:, None] + b.sum(1, dtype=torch.float64)[None] - inter
    return (inter / union.clamp(min=1)).max(1).values.tolist()


def identical(a: list, b: list) -> bool:
    """The same records: masks equal, every other field equal with its type (as JSON writes it), same order."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if not np.array_equal(x["segmentation"], y["segmentation"]):
            return False
        fx = {k: v for k, v in x.items() if k != "segmentation"}
        fy = {k: v for k, v in y.items() if k != "segmentation"}
        if json.dumps(fx) != json.dumps(fy):
            return False
    return True


def agreement(ref_records: list, records: list, device) -> dict:
    ious = best_ious([r["segmentation"] for r in ref_records], [r["segmentation"] for r in records], device)
    return dict(ious=ious, identical=identical(ref_records, records))


def summarize(name, times, masks, agree, n_images) -> dict:
    ious = [x for a in agree for x in a["ious"]]
    return dict(config=name, images=n_images, seconds=round(sum(times), 3),
                images_per_s=round(n_images / sum(times), 3) if sum(times) else None,
                ms_per_image=round(1e3 * statistics.mean(times), 2), masks=sum(masks),
                matched_0_9=round(sum(x >= 0.9 for x in ious) / len(ious), 4) if ious else None,
                median_best_iou=round(statistics.median(ious), 4) if ious else None,
                identical_photos=f"{sum(a['identical'] for a in agree)}/{len(agree)}" if agree else None)


# ---------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------


def run_configs(ctx, model, photos: dict, names: list, settings: dict, section: str, stream: tuple = ()) -> list:
    """Every config on every photo (rotated order, warmed up first), agreement with segment-anything's
    records; then `stream` configs through generate_many over all photos."""
    device = ctx["device"]
    gens = configs(model, device, names, **settings)
    first = next(iter(photos.values()))
    peak = {}  # and no warm-up on the CPU: nothing to tune there
    for name, g in gens.items():  # warm-up (kernel tuning, allocator, lazy init); peak memory per config
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            g.generate(first)
            peak[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    times = {n: [] for n in names}
    masks = {n: [] for n in names}
    agree = {n: [] for n in names}
    reference = {}
    order = list(names)
    for i, (photo, image) in enumerate(photos.items()):
        got = {}
        for name in order[i % len(order):] + order[:i % len(order)]:
            sync(device)
            t = time.perf_counter()
            got[name] = gens[name].generate(image)
            sync(device)
            times[name].append(time.perf_counter() - t)
            masks[name].append(len(got[name]))
        reference[photo] = got["segment-anything"]
        for name in names:
            if name != "segment-anything":
                agree[name].append(agreement(got["segment-anything"], got[name], device))
        print(f"  {section} {photo} {image.shape[1]}x{image.shape[0]}: "
              + ", ".join(f"{n} {len(got[n])} masks {1e3 * times[n][-1]:.0f} ms" for n in names), flush=True)
    rows = []
    for name in names:
        row = dict(section=section, **summarize(name, times[name], masks[name], agree[name], len(photos)))
        row["peak_gib"] = peak.get(name)
        rows.append(row)
    for name in stream:
        gen = gens[name].generator
        sync(device)
        t = time.perf_counter()
        results = list(gen.generate_many(list(photos.values())))
        sync(device)
        seconds = time.perf_counter() - t
        agree_s = [agreement(reference[p], r.records, device) for p, r in zip(photos, results)]
        rows.append(dict(section=section, **summarize(f"{name}, streamed (generate_many)",
                                                       [seconds / len(photos)] * len(photos),
                                                       [len(r.records) for r in results], agree_s, len(photos))))
    base = rows[0]["images_per_s"]  # segment-anything's generator: same-run ratios
    for r in rows:
        r["vs_segment_anything"] = round(r["images_per_s"] / base, 2) if base and r["images_per_s"] else None
    ctx.setdefault("reference", {})[section] = reference
    ctx.setdefault("reference_images_per_s", {})[section] = base
    return rows


def section_amg(ctx):
    names = ["segment-anything", "exact", "fast"]
    if not (ctx["args"].quick and ctx["device"].type != "cuda"):
        names.append("fast, low-res stability")
    if ctx["device"].type == "cuda":
        names += ["fast, model upsampling", "fast, model decoder", "fast, bf16 decoder"]
    stream = ("exact", "fast") if ctx["device"].type == "cuda" else ()  # on the CPU: agreement only
    return run_configs(ctx, ctx["mobile_sam"](), ctx["photos"], names, ctx["settings"], "amg", stream)


def section_breakdown(ctx):
    device, model = ctx["device"], ctx["mobile_sam"]()
    photos = dict(list(ctx["photos"].items())[:ctx["args"].breakdown_images])
    rows = []
    names = ["segment-anything", "exact", "fast, model decoder", "fast, model upsampling", "fast"]
    for name, g in configs(model, device, names, profile=True, **ctx["settings"]).items():
        if device.type == "cuda":  # warm-up
            g.generate(next(iter(photos.values())))
        totals, stages = [], {}
        for image in photos.values():
            sync(device)
            t = time.perf_counter()
            g.generate(image)
            sync(device)
            totals.append(time.perf_counter() - t)
            for k, v in g.seconds.items():
                stages[k] = stages.get(k, 0.0) + v
        ms = {k: round(1e3 * v / len(photos), 2) for k, v in stages.items()}
        ms["total"] = round(1e3 * statistics.mean(totals), 2)
        if name == "segment-anything":
            ms["post"] = round(ms["total"] - ms.get("encoder", 0) - ms.get("decoder", 0), 2)
        rows.append(dict(section="breakdown", config=name, images=len(photos), ms_per_image=ms))
    return rows


def section_crops(ctx):
    args = ctx["args"]
    photos = dict(list(ctx["photos"].items())[:args.crop_images])
    settings = dict(ctx["settings"], crop_n_layers=1)
    if args.quick and ctx["device"].type != "cuda":
        settings["points_per_side"] = 2
    return run_configs(ctx, ctx["mobile_sam"](), photos, ["segment-anything", "exact", "fast"], settings, "crops")


def section_vit(ctx):
    args, device = ctx["args"], ctx["device"]
    photos = dict(list(ctx["photos"].items())[:args.vit_images])
    rows = []
    for model_name in args.vit_models.split(","):
        model = build_model(model_name, args, device)
        for name, g in configs(model, device, ["segment-anything", "exact", "fast, model decoder", "fast"],
                               profile=True, **ctx["settings"]).items():
            if device.type == "cuda":  # warm-up
                g.generate(next(iter(photos.values())))
            totals, stages, n_masks = [], {}, 0
            for image in photos.values():
                sync(device)
                t = time.perf_counter()
                n_masks += len(g.generate(image))
                sync(device)
                totals.append(time.perf_counter() - t)
                for k, v in g.seconds.items():
                    stages[k] = stages.get(k, 0.0) + v
            ms = {k: round(1e3 * v / len(photos), 2) for k, v in stages.items()}
            label = "sam2" if name == "segment-anything" and model_name.startswith("sam2") else name
            rows.append(dict(section="vit", model=model_name, config=label, images=len(photos), masks=n_masks,
                             encoder_ms=ms.get("encoder"), decoder_ms=ms.get("decoder"),
                             total_ms=round(1e3 * statistics.mean(totals), 2), stages_ms=ms))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def median_ms(fn, device, iters: int) -> float:
    """bench_e2e.wall_ms (median wall ms of fn(), the device synchronized around each call), rounded."""
    return round(wall_ms(fn, device, iters), 3)


def section_predictor(ctx):
    from PIL import Image
    from segment_anything import SamPredictor
    from skimage import data

    from sam_sparse import set_image_on_device
    from sam_sparse.predictor import DevicePredictor

    args, device = ctx["args"], ctx["device"]
    w, h = (2250, 1500) if not (args.quick and device.type != "cuda") else (450, 300)
    image = np.array(Image.fromarray(data.coffee()).resize((w, h), Image.BICUBIC))  # writable
    other = np.ascontiguousarray(image[::-1])
    point, label = np.array([[w * 0.49, h * 0.47]]), np.array([1])
    model = build_model("vit_b", args, device)
    if device.type == "cuda":
        model.image_encoder.to(torch.bfloat16)
    predictor = SamPredictor(model)
    graphed = DevicePredictor(predictor, cuda_graph=True)
    variants = {"SamPredictor.predict": lambda: predictor.predict(point_coords=point, point_labels=label),
                "DevicePredictor, eager": DevicePredictor(predictor).predict,
                "DevicePredictor, CUDA graph": graphed.predict,
                "DevicePredictor, CUDA graph, graphed encoder": graphed.predict}
    set_image = {"DevicePredictor, CUDA graph, graphed encoder": graphed.set_image}  # else set_image_on_device
    if device.type != "cuda":
        del variants["DevicePredictor, CUDA graph"], variants["DevicePredictor, CUDA graph, graphed encoder"]
    rows, reference = [], None
    iters = 30 if not args.quick else (5 if device.type == "cuda" else 1)
    with torch.inference_mode():
        set_image_on_device(predictor, image)
        for name, fn in variants.items():
            call = fn if name == "SamPredictor.predict" else (lambda fn=fn: fn(point_coords=point, point_labels=label))
            for _ in range(3 if device.type == "cuda" else 1):  # warm-up (the graph captures on its first call)
                out = call()
            if reference is None:
                reference = out
            row = dict(section="predictor", variant=name, photo=f"{w}x{h}",
                       same_as_sam_predict=all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
                                               for a, b in zip(out, reference)),
                       predict_ms=median_ms(call, device, iters),
                       set_image_plus_predict_ms=median_ms(lambda: (set_image.get(name, lambda im: set_image_on_device(
                           predictor, im))(image), call()), device, max(1, iters // 3)))
            if name.startswith("DevicePredictor, CUDA graph"):
                row["graph_errors"] = list(fn.__self__.graph_errors.values())
            if name in set_image:
                row["graph_errors"] += list(graphed.encoder_graph.errors.values())
            if name in set_image:  # the graphed encoder's features are the encoder's own
                set_image[name](image)
                graphed_features = predictor.features.clone()
                set_image_on_device(predictor, image)
                row["same_features"] = bool(torch.equal(graphed_features, predictor.features))
            # another image (a graph copies its features in): still SamPredictor.predict's results
            set_image_on_device(predictor, other)
            row["same_on_another_image"] = all(np.array_equal(a, b) for a, b in zip(call(), predictor.predict(
                point_coords=point, point_labels=label)))
            set_image_on_device(predictor, image)
            rows.append(row)
    return rows


def section_variants(ctx):
    """The amg rows for --variants (fast mode's variants: the model's decoder, prefilter, decoder dtype, compiled decoder)."""
    names = ["segment-anything"] + [n.strip() for n in ctx["args"].variants.split(";") if n.strip()]
    return run_configs(ctx, ctx["mobile_sam"](), ctx["photos"], names, ctx["settings"], "variants")


def section_compile(ctx):
    device, model = ctx["device"], ctx["mobile_sam"]()
    photos = ctx["photos"]
    reference = ctx.get("reference", {}).get("amg")
    if reference is None:  # the amg section did not run in this process: segment-anything's records here
        sa = TimedReference(model, device, **ctx["settings"])
        reference = {photo: sa.generate(image) for photo, image in photos.items()}
    g = configs(model, device, ["fast, compiled decoder"], **ctx["settings"])["fast, compiled decoder"]
    first = next(iter(photos.values()))
    sync(device)
    t = time.perf_counter()
    g.generate(first)
    sync(device)
    compile_s = time.perf_counter() - t
    times, masks, agree = [], [], []
    for photo, image in photos.items():
        sync(device)
        t = time.perf_counter()
        records = g.generate(image)
        sync(device)
        times.append(time.perf_counter() - t)
        masks.append(len(records))
        agree.append(agreement(reference[photo], records, device))
    row = dict(section="compile", **summarize("fast, compiled decoder", times, masks, agree, len(photos)))
    row["first_call_s"] = round(compile_s, 1)
    base = ctx.get("reference_images_per_s", {}).get("amg")
    row["vs_segment_anything"] = round(row["images_per_s"] / base, 2) if base else None
    return [row]


def section_profile(ctx):
    """GPU kernels of one generate() per config on the first --breakdown-images photos (profile_encoder's
    gpu_profile): wall and GPU ms per image, by class, and the top kernels (in the .md as well)."""
    from profile_encoder import gpu_profile, top_table

    device, model = ctx["device"], ctx["mobile_sam"]()
    if device.type != "cuda":
        raise RuntimeError("the profile section needs a CUDA GPU")
    photos = list(ctx["photos"].values())[:ctx["args"].breakdown_images]
    names = ["exact", "fast, model decoder", "fast, model upsampling", "fast"]
    rows = []
    for name, g in configs(model, device, names, **ctx["settings"]).items():
        g.generate(photos[0])  # warm-up
        it = iter(photos)
        r = gpu_profile(lambda: g.generate(next(it)), len(photos), top=15)
        rows.append(dict(config=name, images=len(photos), wall_ms=round(r["wall_ms"], 2),
                         gpu_ms=round(r["total_ms"], 2), by_class={k: round(v, 2) for k, v in r["by_class"].items()},
                         top=r["top"]))
    with open(ctx["args"].out / "bench_amg.md", "a") as f:
        f.write("\n".join(top_table(rows, lambda r: f"profile, {r['config']}")) + "\n")
    return [{k: v for k, v in r.items() if k != "top"} | {"top3": [n for _, n, _ in r["top"][:3]]} for r in rows]


def section_cli(ctx):
    """`sam-sparse amg` itself, as a user runs it (a subprocess: model load, image files read, streaming,
    PNG + CSV outputs written), per mode on the photos saved as PNG files. A first run on all photos warms
    Triton's on-disk kernel cache (a user's first run on a machine compiles the kernels once, ~10 s); then
    runs on one photo and on all: the steady rate (all - 1) / (wall(all) - wall(one)) leaves out the
    start-up, and the median of the manifest's per-image seconds says the same from inside the run."""
    import os
    import tempfile

    from PIL import Image

    args, photos = ctx["args"], ctx["photos"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        every, one = Path(tmp, "photos"), Path(tmp, "one")
        every.mkdir()
        one.mkdir()
        for i, (name, img) in enumerate(photos.items()):
            Image.fromarray(img).save(every / f"{name}.png")
            if i == 0:
                Image.fromarray(img).save(one / f"{name}.png")
        weights = ["--checkpoint", str(args.mobile_sam_checkpoint)] if args.mobile_sam_checkpoint else []
        env = dict(os.environ, SAM_SPARSE_DEVICE=str(ctx["device"]))  # the CLI's default device
        for mode in ("exact", "fast"):
            walls, manifests = {}, {}
            for label, folder in (("warm-up", every), ("one", one), ("all", every)):
                out = Path(tmp, f"out_{mode}_{label}")
                cmd = [sys.executable, "-m", "sam_sparse", "amg", str(folder), "--out", str(out),
                       "--model-type", "mobile_sam", *weights, "--mode", mode,
                       "--points-per-side", str(ctx["settings"]["points_per_side"])]
                t = time.perf_counter()
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                walls[label] = time.perf_counter() - t
                if done.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)}: exit {done.returncode}\n{done.stderr[-2000:]}")
                manifests[label] = json.loads((out / "manifest.json").read_text())
            n = len(photos)
            per_image = [r["seconds"] for r in manifests["all"]["images"]]
            steady = (n - 1) / (walls["all"] - walls["one"]) if n > 1 else None
            rows.append(dict(config=f"sam-sparse amg --mode {mode}", images=n, wall_s_first_run=round(walls["warm-up"], 2),
                             wall_s_all=round(walls["all"], 2), wall_s_one=round(walls["one"], 2),
                             images_per_s_steady=None if steady is None else round(steady, 3),
                             images_per_s_median=round(1 / statistics.median(per_image), 3),
                             images_per_s_with_startup=round(n / walls["all"], 3)))
    return rows


SECTIONS = {"amg": section_amg, "breakdown": section_breakdown, "crops": section_crops, "vit": section_vit,
            "predictor": section_predictor, "compile": section_compile, "profile": section_profile,
            "variants": section_variants, "cli": section_cli}


# ---------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------


def table(rows: list) -> str:
    """A markdown table of the rows' scalar fields (dicts as k=v lists)."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "section"))
    fmt = lambda v: ", ".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else ("–" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def append(out: Path, section: str, rows: list, seconds: float) -> None:
    with open(out / "bench_amg.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(dict(r, section=section)) + "\n")
        f.write(json.dumps(dict(section=section, section_seconds=round(seconds, 1))) + "\n")
    with open(out / "bench_amg.md", "a") as f:
        f.write(f"\n### {section} ({seconds:.0f} s)\n\n{table(rows)}\n")


def git_commit() -> str:
    import os

    if os.environ.get("SAM_SPARSE_COMMIT"):
        return os.environ["SAM_SPARSE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for bench_amg.jsonl and bench_amg.md (appended)")
    ap.add_argument("--only", default=None, help=f"comma list of sections ({', '.join(SECTIONS)}); default: all "
                                                 "but compile, profile and variants")
    ap.add_argument("--compile", action="store_true", help="also run the compile section")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer photos (on CPU: small photos, few points)")
    ap.add_argument("--device", default=None, help="default cuda if available, else cpu")
    ap.add_argument("--images", type=int, default=None, help="photos for amg / compile (default 20; quick 4, CPU 1)")
    ap.add_argument("--crop-images", type=int, default=None, help="photos for crops (default 10; quick 2, CPU 1)")
    ap.add_argument("--breakdown-images", type=int, default=None, help="photos for breakdown (default 5; quick 2, CPU 1)")
    ap.add_argument("--vit-images", type=int, default=None, help="photos per vit model (default 3; quick 1)")
    ap.add_argument("--vit-models", default=None,
                    help="the vit section's models: vit_b / vit_l / vit_h or SAM 2.1 types such as sam2.1_hiera_b+ "
                         "(default vit_b,vit_h; quick: vit_b)")
    ap.add_argument("--images-dir", type=Path, help="photos from files (sorted by path) instead of scikit-image's")
    ap.add_argument("--export-photos", type=Path, metavar="DIR", help="only write the photo set as PNGs into DIR")
    ap.add_argument("--mobile-sam-checkpoint", type=Path, help="MobileSAM's weights (default: fetch_mobile_sam())")
    ap.add_argument("--points-per-side", type=int, default=None, help="default 32 (CPU quick: 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="fast;fast, model upsampling;exact, fused upsampling;fast, model decoder;"
                                          "fast, bf16 decoder;fast, model decoder, bf16;fast, compiled decoder;"
                                          "fast, bf16, compiled decoder",
                    help="configs for the variants section (names in configs(), separated by ';')")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cpu_quick = args.quick and device.type != "cuda"
    q = lambda full, quick: quick if args.quick else full  # noqa: E731
    args.images = args.images or q(20, 1 if cpu_quick else 4)
    args.crop_images = args.crop_images or q(10, 1 if cpu_quick else 2)
    args.breakdown_images = args.breakdown_images or q(5, 1 if cpu_quick else 2)
    args.vit_images = args.vit_images or q(3, 1)
    args.vit_models = args.vit_models or q("vit_b,vit_h", "vit_b")
    pps = args.points_per_side or (4 if cpu_quick else 32)

    if args.export_photos:
        from PIL import Image

        args.export_photos.mkdir(parents=True, exist_ok=True)
        for name, img in photo_set(args.images).items():
            Image.fromarray(img).save(args.export_photos / f"{name}.png")
        print(f"wrote {args.images} photos to {args.export_photos}")
        return
    if args.images_dir:
        from sam_sparse.amg import find_images
        from sam_sparse.segment import load_image

        photos = {p.stem: load_image(p) for p in find_images(args.images_dir)[:args.images]}
    else:
        photos = photo_set(args.images, max_side=256 if cpu_quick else 0)

    from sam_sparse import __version__

    args.out.mkdir(parents=True, exist_ok=True)
    sections = args.only.split(",") if args.only else [s for s in SECTIONS if s not in ("compile", "profile", "variants", "cli")
                                                       or (s == "compile" and args.compile)]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--only: unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), sam_sparse=__version__,
                commit=git_commit(), torch=torch.__version__, python=platform.python_version(), device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", quick=args.quick,
                points_per_side=pps, sections=sections, argv=sys.argv[1:],
                photos=[f"{k} {v.shape[1]}x{v.shape[0]}" for k, v in photos.items()])
    with open(args.out / "bench_amg.jsonl", "a") as f:
        f.write(json.dumps(dict(section="meta", **meta)) + "\n")
    with open(args.out / "bench_amg.md", "a") as f:
        f.write(f"\n## bench_amg {meta['date']}, {meta['gpu']}, commit {meta['commit'][:7]}, "
                f"torch {meta['torch']}, {pps} points per side\n\nphotos: {', '.join(meta['photos'])}\n")
    print(json.dumps({k: v for k, v in meta.items() if k != "photos"}), flush=True)

    cache = {}

    def mobile_sam():
        if "model" not in cache:
            cache["model"] = build_model("mobile_sam", args, device)
        return cache["model"]

    ctx = dict(args=args, device=device, photos=photos, mobile_sam=mobile_sam,
               settings=dict(points_per_side=pps))
    t_all, failed = time.time(), []
    for name in sections:
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            rows = SECTIONS[name](ctx)
        except Exception as e:  # recorded; the next section still runs
            rows = [dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])]
            print(rows[0]["traceback"], file=sys.stderr, flush=True)
            failed.append(name)
        seconds = time.time() - t0
        append(args.out, name, rows, seconds)
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
        print(f"== {name}: {seconds:.0f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"all sections: {time.time() - t_all:.0f} s; wrote {args.out / 'bench_amg.jsonl'} and {args.out / 'bench_amg.md'}")
    if failed:
        sys.exit(f"bench_amg: section(s) {', '.join(failed)} failed (their error rows are in bench_amg.jsonl)")


if __name__ == "__main__":
    main()
