"""Video benchmark: SAM 2's video predictor, ms per frame at N objects, where the time goes, and parity.

A new script rather than an extension: no existing one times video (bench_e2e.py times the image
encoder and the image predictor, side_by_side.py image encoders, bench_amg.py mask generation), and a
video run differs in everything but the timing helpers, which come from bench_e2e (DTYPES, sync).

For each SAM 2.1 model type (sam2's build_sam2_video_predictor, random weights with the attention
sharpened as tests/sam2_helpers.py does: no checkpoint is reachable) and each object count N, on a
synthetic clip (moving discs and boxes on a textured background, written as JPEGs, 1280 x 720 by
default), objects 0..N-1 are prompted on frame 0 (even ones by a point at the shape's centre, odd ones
by its box), then `propagate_in_video` runs over the clip, under inference_mode and bf16 autocast as
SAM 2's README runs it. Configurations, all in one process (same-run ratios):
  unpatched           SAM 2 as is
  dense-per-object    patch_sam(predictor, "dense", batch_objects=False): SAM 2's own per-object loop
  dense-batched       patch_sam(predictor, "dense", batch_objects=True): every object of a frame in one batch
                      (the image encoder and, once the memory is full, the heads replayed from CUDA graphs)
  dense-batched-heads-eager  the same with graph_heads=False: the heads launched from Python every frame
  memory-local        patch_sam(predictor, "memory-local", batch_objects=True): batched, sparse memory
                      cross-attention
A configuration that fails is reported as an error row; the others still run.

Per configuration, three passes over the clip (prompts re-added each time):
  1. warm-up: untimed (first calls, kernel tuning for every memory length the clip reaches);
  2. timed: the wall time of each frame (the device synchronized before and after the generator yields
     it, so the mask upsampling to video size is in it), no hooks; reported: the median over the frames
     whose memory is full (frame index >= --settled-from, default 16: SAM 2 keeps 7 memory frames and 16
     object pointers, so from frame 16 on no memory grows and a patched predictor replays its heads);
  3. breakdown: model.forward_image (wrapped: the image encoder, which a patched predictor replays from a
     CUDA graph), and forward pre/post hooks on model.memory_attention (and its layers, if they are called
     on their own), model.sam_mask_decoder, model.memory_encoder record CUDA events
     (perf_counter on CPU), summed per frame; "other" is the frame's time in this pass minus the four
     (prompt encoder, memory gathering, RoPE tables, upsampling, the Python around them). Medians over
     the same frames; the pass's own total is reported too (hooks cost a little). A patched predictor runs
     its heads eagerly in this pass (graph_heads off: hooks never run inside a replayed CUDA graph), so its
     total is above the timed pass's.
Parity, from the timed pass: every object's low-res mask logits on every propagated frame, as the
predictor stores them; per frame the worst object's mask IoU (logits > 0) and the max abs logit
difference, against unpatched, and for the batched configurations against dense-per-object.

With --profile (CUDA), a fourth pass runs the settled frames under torch.profiler: wall vs GPU ms per
frame (wall far above GPU: the host sets the pace) and the top kernels.

Writes --out/bench_video.json and --out/bench_video.md after every row (a cut run keeps its rows).

    python scripts/bench_video.py --out $OUT                    # hiera_l, hiera_b+; 1, 4, 16 objects; all configurations
    python scripts/bench_video.py --models sam2.1_hiera_l --objects 16 --configs unpatched,dense-batched
    python scripts/bench_video.py --quick --out /tmp/v         # hiera_t, 384 px, 2 objects, 4 frames: CPU smoke test
    python scripts/bench_video.py --vos --models sam2.1_hiera_l --objects 1,4 --configs unpatched,dense-per-object,dense-batched
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # propagate_in_video's progress bar, one line per frame otherwise

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_e2e import DTYPES, sync
from sam2_helpers import compile_backend, sharpen_attention_  # the tests' recipes, one copy

from sam_sparse import patch_sam
from sam_sparse.models import build_video_predictor
from sam_sparse.patches.video_parity import mask_iou
from sam_sparse.sam2_layers import SAM2_CONFIGS

CONFIGS = ("unpatched", "dense-per-object", "dense-batched", "dense-batched-heads-eager", "memory-local")
STAGES = ("image_encoder", "memory_attention", "mask_decoder", "memory_encoder")
SETTLED_FROM = 16  # SAM 2's num_maskmem 7 and max_obj_ptrs_in_encoder 16: from frame 16 on no memory grows


# ---------------------------------------------------------------------------------------------------
# The clip
# ---------------------------------------------------------------------------------------------------


def shapes_track(n: int, frames: int, width: int, height: int, seed: int = 0):
    """n moving shapes: per shape (kind "disc" | "box", colour, radius) and its centre on every frame,
    bouncing off the borders. Returns (specs, centres float (frames, n, 2) as x, y in pixels)."""
    g = np.random.default_rng(seed)
    scale = min(width, height)
    specs, pos, vel = [], [], []
    for i in range(n):
        r = float(g.uniform(0.05, 0.09) * scale)
        specs.append(("disc" if i % 2 == 0 else "box", tuple(int(c) for c in g.integers(40, 256, 3)), r))
        pos.append([g.uniform(r, width - r), g.uniform(r, height - r)])
        vel.append(g.uniform(-0.02, 0.02, 2) * scale)
    pos, vel = np.array(pos), np.array(vel)
    centres = np.zeros((frames, n, 2))
    radius = np.array([s[2] for s in specs])[:, None]
    lo, hi = radius, np.array([width, height])[None] - radius
    for t in range(frames):
        centres[t] = pos
        pos = pos + vel
        vel = np.where((pos < lo) | (pos > hi), -vel, vel)
        pos = np.clip(pos, lo, hi)
    return specs, centres


def write_clip(folder: Path, frames: int, width: int, height: int, shapes: int, seed: int = 0):
    """Frames 00000.jpg ... as SAM 2's init_state reads them: shapes moving over a textured background
    (a gradient and low-frequency stripes, plus noise). Returns the prompts of every shape on frame 0:
    [("point", (x, y)) | ("box", (x0, y0, x1, y1))], shape i prompted by a point when i is even."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    specs, centres = shapes_track(shapes, frames, width, height, seed)
    g = np.random.default_rng(seed + 1)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    base = np.stack([96 + 64 * np.sin(xx / width * 7), 96 + 64 * np.cos(yy / height * 5),
                     80 + 40 * np.sin((xx + yy) / (width + height) * 11)], -1)
    for t in range(frames):
        img = base + g.normal(0, 6, base.shape)
        for (kind, colour, r), (cx, cy) in zip(specs, centres[t]):
            inside = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) if kind == "disc" else (
                (np.abs(xx - cx) < r) & (np.abs(yy - cy) < 0.7 * r))
            img[inside] = colour
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{t:05d}.jpg", quality=95)
    prompts = []
    for i, ((kind, _, r), (cx, cy)) in enumerate(zip(specs, centres[0])):
        prompts.append(("point", (cx, cy)) if i % 2 == 0 else ("box", (cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r)))
    return prompts


# ---------------------------------------------------------------------------------------------------
# The model and its configurations
# ---------------------------------------------------------------------------------------------------


def random_video_predictor(model_type: str, device, image_size=None, seed: int = 0, vos_backend=None):
    """sam2's video predictor for a SAM 2.1 model type (models.build_video_predictor), random weights
    (seeded), attention sharpened. vos_backend: build SAM2VideoPredictorVOS, its torch.compile calls as sam2
    makes them ("inductor": mode max-autotune, fullgraph) or sent to another backend ("eager": dynamo alone,
    for a CPU smoke test)."""
    torch.manual_seed(seed)
    with compile_backend(None if vos_backend == "inductor" else vos_backend):  # inductor: as sam2 makes them
        predictor = build_video_predictor(model_type, None, "cpu", image_size, vos_optimized=vos_backend is not None)
    return sharpen_attention_(predictor, seed=seed).to(device).eval()


def config_kwargs(config: str):
    """(policy, patch_sam keywords) of a configuration, None for unpatched."""
    kwargs = {"unpatched": None, "dense-per-object": ("dense", {"batch_objects": False}),
              "dense-batched": ("dense", {"batch_objects": True}),
              "dense-batched-heads-eager": ("dense", {"batch_objects": True, "graph_heads": False}),
              "memory-local": ("memory-local", {"batch_objects": True})}
    if config not in kwargs:
        raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")
    return kwargs[config]


@contextlib.contextmanager
def configured(predictor, config: str):
    spec = config_kwargs(config)
    handle = None if spec is None else patch_sam(predictor, spec[0], **spec[1])
    try:
        yield handle
    finally:
        if handle is not None:
            handle.restore()


def memory_cross_density(handle):
    """Mean density over the patched memory.cross modules (None when none reports one)."""
    if handle is None:
        return None
    d = [r.density for r in handle.report if r.kind == "memory.cross" and r.density is not None]
    return round(sum(d) / len(d), 4) if d else None


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


class StageTimer:
    """Forward pre/post hooks that time the model's stages per frame (see the module docstring).

    A stage is timed from the outermost entry into any of its modules to the matching exit, so that
    memory attention called whole or layer by layer counts once. take() syncs and returns
    {stage: ms since the last take()}."""

    def __init__(self, model, device):
        self.cuda = device.type == "cuda"
        self.depth = dict.fromkeys(STAGES, 0)
        self.spans = {s: [] for s in STAGES}
        self.handles = []
        mods = {"memory_attention": [model.memory_attention, *model.memory_attention.layers],
                "mask_decoder": [model.sam_mask_decoder], "memory_encoder": [model.memory_encoder]}
        # The image encoder through forward_image (an instance attribute over the class's method): a patched
        # video predictor replays it from a CUDA graph, where module hooks never run.
        self.model, forward_image = model, model.forward_image

        def timed_forward_image(img_batch):
            self._enter("image_encoder")
            try:
                return forward_image(img_batch)
            finally:
                self._exit("image_encoder")

        model.forward_image = timed_forward_image
        for stage, modules in mods.items():
            for m in modules:
                self.handles.append(m.register_forward_pre_hook(lambda *a, s=stage: self._enter(s)))
                self.handles.append(m.register_forward_hook(lambda *a, s=stage: self._exit(s)))

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _enter(self, stage):
        self.depth[stage] += 1
        if self.depth[stage] == 1:
            self.spans[stage].append([self._now(), None])

    def _exit(self, stage):
        self.depth[stage] -= 1
        if self.depth[stage] == 0:
            self.spans[stage][-1][1] = self._now()

    def take(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for s in STAGES:
            if self.cuda:
                out[s] = sum(a.elapsed_time(b) for a, b in self.spans[s])
            else:
                out[s] = sum((b - a) * 1e3 for a, b in self.spans[s])
            self.spans[s].clear()
        return out

    def remove(self):
        for h in self.handles:
            h.remove()
        del self.model.forward_image


def add_prompts(predictor, state, prompts):
    predictor.reset_state(state)
    for obj_id, (kind, coords) in enumerate(prompts):
        if kind == "point":
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, points=np.array([coords], np.float32),
                                            labels=np.array([1], np.int32))
        else:
            predictor.add_new_points_or_box(state, frame_idx=0, obj_id=obj_id, box=np.array(coords, np.float32))


def propagate(predictor, state, device, timer=None):
    """One pass of propagate_in_video: per propagated frame (frame 0 holds the prompts' outputs)
    {frame, ms, stages?}."""
    frames = []
    it = predictor.propagate_in_video(state)
    while True:
        sync(device)
        t = time.perf_counter()
        try:
            frame_idx, _, _ = next(it)
        except StopIteration:
            break
        sync(device)
        ms = (time.perf_counter() - t) * 1e3
        stages = timer.take() if timer is not None else None
        if frame_idx > 0:
            frames.append({"frame": frame_idx, "ms": ms, "stages": stages})
    return frames


def low_res_logits(state) -> torch.Tensor:
    """float32 (propagated frames, objects, h, w): every object's stored low-res mask logits, on the CPU."""
    per_obj = state["output_dict_per_obj"]
    frames = sorted(per_obj[0]["non_cond_frame_outputs"])
    return torch.stack([torch.cat([per_obj[i]["non_cond_frame_outputs"][f]["pred_masks"].float().cpu()
                                   for i in sorted(per_obj)], 0)[:, 0] for f in frames])


def frame_parity(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """Per propagated frame, the worst object's mask IoU and the max abs logit difference of
    low_res_logits tensors (frames, objects, h, w); and their extremes."""
    iou = mask_iou(ref > 0, other > 0).min(1).values
    err = (ref - other).abs().flatten(1).max(1).values
    return {"min_iou": round(float(iou.min()), 6), "max_logit_err": round(float(err.max()), 5),
                "iou_per_frame": [round(float(x), 6) for x in iou], "err_per_frame": [round(float(x), 5) for x in err]}


def settled(frames, settled_from: int):
    """The frames whose memory is full (index >= settled_from), or all of them when the clip is shorter."""
    full = [f for f in frames if f["frame"] >= settled_from]
    return full or frames


def run_config(args, predictor, state, prompts, config, device, dtype):
    """The three passes of one configuration (module docstring); returns (row fields, logits)."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with configured(predictor, config) as handle, torch.inference_mode(), autocast:
        t = time.perf_counter()
        add_prompts(predictor, state, prompts)
        propagate(predictor, state, device)
        first = time.perf_counter() - t
        add_prompts(predictor, state, prompts)
        timed = settled(propagate(predictor, state, device), args.settled_from)
        logits = low_res_logits(state)
        timer = StageTimer(predictor, device)
        heads_graphed = handle is not None and handle.memory.graph_heads
        if heads_graphed:
            handle.memory.graph_heads = False  # the hooks must run: no replayed graph of the heads in this pass
        try:
            add_prompts(predictor, state, prompts)
            hooked = settled(propagate(predictor, state, device, timer), args.settled_from)
        finally:
            timer.remove()
            if heads_graphed:
                handle.memory.graph_heads = True
        density = memory_cross_density(handle)
        profiled = profile_frames(predictor, state, prompts, args) if args.profile else None
    ms = statistics.median(f["ms"] for f in timed)
    breakdown = {s: statistics.median(f["stages"][s] for f in hooked) for s in STAGES}
    breakdown["other"] = statistics.median(f["ms"] - sum(f["stages"].values()) for f in hooked)
    row = {"ms": round(ms, 3), "fps": round(1e3 / ms, 2), "frames_timed": [f["frame"] for f in timed],
               "ms_per_frame": [round(f["ms"], 3) for f in timed], "warmup_s": round(first, 2),
               "breakdown": {k: round(v, 3) for k, v in breakdown.items()},
               "breakdown_total_ms": round(statistics.median(f["ms"] for f in hooked), 3),
               "breakdown_frame_ms": [round(f["ms"], 3) for f in hooked],
               "memory_cross_density": density}
    if profiled:
        row["profile"] = profiled
    return row, logits


def profile_frames(predictor, state, prompts, args) -> dict:
    """A fourth pass, the frames from --settled-from on under torch.profiler (profile_encoder's
    gpu_profile): wall and GPU ms per frame, by kernel class, and the top kernels."""
    from profile_encoder import gpu_profile

    add_prompts(predictor, state, prompts)
    it = predictor.propagate_in_video(state)
    settled_from = min(max(args.settled_from, 1), args.frames - 1)
    for frame_idx, _, _ in it:
        if frame_idx >= settled_from - 1:
            break
    r = gpu_profile(lambda: next(it), args.frames - settled_from, top=15)
    for _ in it:  # the generator runs to its end (SAM 2 tidies its state there)
        pass
    return {"wall_ms": round(r["wall_ms"], 2), "gpu_ms": round(r["total_ms"], 2),
            "by_class": {k: round(v, 2) for k, v in r["by_class"].items()}, "top": r["top"]}


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def markdown(meta, rows) -> str:
    base = {(r["model"], r["objects"]): r["ms"] for r in rows if r["config"] == "unpatched" and "ms" in r}
    lines = [(f"SAM 2 video, {meta['gpu']} ({meta['device']}), {meta['dtype']}, {meta['width']}x{meta['height']} clip "
             f"of {meta['frames']} frames, image size {meta['image_size'] or 1024} px; median ms per frame over "
             f"frames >= {meta['settled_from']}; random weights; "
             f"{'vos_optimized (' + meta['vos_optimized'] + '); ' if meta.get('vos_optimized') else ''}{meta['date']}."), "",
             ("| model | objects | config | ms/frame | fps | vs unpatched | encoder | memory attn | decoder | "
             "memory enc | other | memory.cross density | min IoU vs unpatched | max logit err | "
             "min IoU vs per-object | max logit err |"),
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)
    for r in rows:
        head = f"| {r['model']} | {r['objects']} | {r['config']} |"
        if "ms" not in r:
            lines.append(f"{head} error: {r.get('error', '')[:80]} |" + " |" * 12)
            continue
        b, bd = base.get((r["model"], r["objects"])), r["breakdown"]
        pu, pp = r.get("parity_vs_unpatched") or {}, r.get("parity_vs_per_object") or {}
        lines.append(
            f"{head} {r['ms']:.1f} | {r['fps']:.1f} | {fmt(b / r['ms'] if b else None, '.2f')}x | "
            + " | ".join(f"{bd[s]:.1f}" for s in STAGES + ("other",))
            + f" | {fmt(r.get('memory_cross_density'), '.3f')} | {fmt(pu.get('min_iou'), '.4f')} | "
            f"{fmt(pu.get('max_logit_err'), '.3g')} | {fmt(pp.get('min_iou'), '.4f')} | {fmt(pp.get('max_logit_err'), '.3g')} |")
    profiled = [dict(r["profile"], title=f"{r['model']} {r['objects']} objects {r['config']}") for r in rows if r.get("profile")]
    if profiled:
        from profile_encoder import top_table

        lines += ["", "Profiled frames (--profile): wall vs GPU ms per frame, GPU ms by kernel class.", "",
                  "| run | wall ms | GPU ms | attention | gemm | other |", "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['title']} | {p['wall_ms']:.1f} | {p['gpu_ms']:.1f} | " + " | ".join(
            f"{p['by_class'][c]:.1f}" for c in ("attention", "gemm", "other")) + " |" for p in profiled]
        lines += top_table(profiled, lambda p: p["title"])
    return "\n".join(lines) + "\n"


def write(out: Path, meta, rows):
    """bench_video.json and .md in out, each replaced whole (a temporary file renamed)."""
    for name, text in (("bench_video.json", json.dumps({"meta": meta, "rows": rows}, indent=1)),
                       ("bench_video.md", markdown(meta, rows))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sam2.1_hiera_l,sam2.1_hiera_b+", help="comma list of SAM 2.1 model types")
    ap.add_argument("--objects", default="1,4,16", help="comma list of object counts")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--frames", type=int, default=32, help="clip length (frame 0 holds the prompts)")
    ap.add_argument("--settled-from", type=int, default=SETTLED_FROM,
                    help="median over frames with this index and later (memory full)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--image-size", type=int, default=None, help="the model's input size (default: the config's, 1024)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype (fp32: no autocast)")
    ap.add_argument("--device", default=None, help="default cuda if available, else cpu")
    ap.add_argument("--profile", action="store_true",
                    help="a fourth pass per configuration under torch.profiler (CUDA): GPU vs wall ms per settled frame, "
                         "top kernels")
    ap.add_argument("--quick", action="store_true",
                    help="hiera_t at 384 px (a 24x24 memory grid, where memory-local is sparse), 2 objects, 4 frames "
                         "of 256x144, fp32 on CPU: a smoke test (< 2 min)")
    ap.add_argument("--vos", nargs="?", const="inductor", default=None, choices=["inductor", "eager"],
                    help="sam2's vos_optimized predictor (SAM2VideoPredictorVOS: torch.compile, max-autotune, "
                         "fullgraph; the first frames compile for minutes); --vos eager: dynamo only, a CPU smoke "
                         "test. memory-local is refused there (an error row, as patch_sam says why)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_video",
                    help="folder for bench_video.json / .md (default $OUT/bench_video)")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        args.models, args.objects, args.frames, args.settled_from = "sam2.1_hiera_t", "2", 4, 1
        args.width, args.height, args.image_size = 256, 144, 384  # 256 px: memory-local keeps every block
        if device.type == "cpu":
            args.dtype = "fp32"
    if args.profile and device.type != "cuda":
        ap.error("--profile needs a CUDA GPU (it profiles GPU kernels)")
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS] + [m for m in args.models.split(",") if m not in SAM2_CONFIGS]
    if bad:
        ap.error(f"unknown {', '.join(bad)}; configs: {', '.join(CONFIGS)}; models: {', '.join(SAM2_CONFIGS)}")
    objects = [int(n) for n in args.objects.split(",")]
    dtype = DTYPES[args.dtype]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                "python": platform.python_version(), "device": str(device), "argv": sys.argv[1:] if argv is None else argv,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "dtype": args.dtype,
                "frames": args.frames, "width": args.width, "height": args.height, "image_size": args.image_size,
                "settled_from": args.settled_from, "vos_optimized": args.vos,
                "commit": os.environ.get("SAM_SPARSE_COMMIT", "unknown")}
    print(json.dumps(meta), flush=True)
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        prompts = write_clip(Path(tmp), args.frames, args.width, args.height, max(objects))
        for model_type in args.models.split(","):
            predictor = random_video_predictor(model_type, device, args.image_size, vos_backend=args.vos)
            with torch.inference_mode():
                state = predictor.init_state(tmp)
            for n in objects:
                logits = {}
                for config in configs:
                    row = {"model": model_type, "objects": n, "config": config}
                    try:
                        fields, logits[config] = run_config(args, predictor, state, prompts[:n], config, device, dtype)
                        row.update(fields)
                        if config != "unpatched" and "unpatched" in logits:
                            row["parity_vs_unpatched"] = frame_parity(logits["unpatched"], logits[config])
                        if config in ("dense-batched", "memory-local") and "dense-per-object" in logits:
                            row["parity_vs_per_object"] = frame_parity(logits["dense-per-object"], logits[config])
                    except Exception as e:  # noqa: BLE001  one failing configuration must not lose the others' numbers
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                        traceback.print_exc()
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))}), flush=True)
                    meta["seconds"] = round(time.time() - t0, 1)
                    write(args.out, meta, rows)
            del predictor, state
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(markdown(meta, rows))
    print(f"wrote {args.out / 'bench_video.json'} and bench_video.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
