"""The kernel runtime, measured on a GPU in one run: host cost per call, the decoder's predict_torch, the
first forward in a fresh process, and SamPredictor on a large photo in fp32 and bf16.

Sections (--only picks some; every row goes to $OUT/runtime.jsonl as it is measured):
  host       CPU time from Python entry to launch return of block_sparse_attn (and of a whole patched
             attention module), with the GPU kept busy by a long sleep kernel so that no call waits.
  decoder    predict_torch (one point, 3 masks) on set features: unpatched vs patched (dense,
             region_focused), eager and with the mask decoder compiled with CUDA graphs.
  firstcall  the first forward of a patched encoder (--model, default vit_h; batch 8, bf16) in a fresh
             process: empty caches; then with the caches the first process left (Triton's kernels +
             sam-sparse's tuning results); then with Triton's kernels only (SAM_SPARSE_TUNE_CACHE=0).
             SAM 2.1 types (sam2.1_hiera_b+, ...) time sam2's image encoder. The patched encoder's first call
             compiles its kernels ahead; the fresh and the next process also run with that off
             (handle.memory.compile_ahead = False; the fresh one with caches of its own).
             Each row also lists the shape classes the tuner met, their candidates and seconds (where a first
             call's time goes), and how many compile-ahead passes ran.
  predictor  SamPredictor, vit_b, batch 1, eager, on a 1500 x 2250 photo (scikit-image's coffee,
             upscaled): fp32 original vs patched dense under each float32 matmul precision; then the
             encoder in bf16 with set_image_on_device. SAM's CPU resize is timed on its own.
  precision  one vit_b global layer in fp32: relative error against float64 of the kernel under
             "highest" (3xTF32) and "high" (TF32), and of PyTorch's own fp32 math.
  compiledhost  host and GPU time per call under torch.compile (no CUDA graphs) at batch 1: one windowed and
             one global Hiera block of --sam2-model and its whole image encoder, sam2's own against
             patched dense (which of the two a batch-1 compiled row waits on); then one attention call's
             host time by part (public function, torch op, plan, arguments, launcher, output) at each
             stage's shape, and a cProfile of the compiled patched encoder.
  hostparts  the last part of compiledhost alone: one attention call's host time by part at each Hiera stage's
             shape of --sam2-model, patched dense, batch 1.
  sam2ab     SAM 2.1 image encoders (--sam2-model, a comma list) at batch 1, bf16: sam2's own against
             patched dense, eager (patched: with its batch-1 CUDA graph and without), compiled (default mode)
             and compiled with mode="reduce-overhead", timed in alternating rounds in one process (the batch-1
             rows are host-bound, and the host's speed drifts).
  sam2b8     the same encoders at batch 8 (issue 22's 1.15x compiled target), eager and compiled (default mode),
             in alternating rounds in one process: side_by_side times its rows one after another, and clocks
             that drift between rows move its ratio by a percent or so (hiera_l: 1.147x and 1.150x, runs 110-111).
             The compiled ones are also timed by GPU events (triton's do_bench, as side_by_side), in the same
             process: wall clock and events disagreed for the patched encoders across runs 116-118 (in one
             process they agree: run 126); and their host time per call with the GPU busy, and their syncs.
  sam2predictor  SAM2ImagePredictor (--sam2-model, default sam2.1_hiera_b+, random weights), batch 1,
             on the same 1500 x 2250 photo under bf16 autocast, as SAM 2's README runs it: sam2 unpatched
             vs patched dense; set_image, predict (one point, 3 masks) and the mask IoU between them.

    python scripts/bench_runtime.py [--only host,decoder] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from bench_e2e import build, wall_ms  # noqa: E402

from sam_sparse import block_sparse_attn, patch_sam  # noqa: E402
from sam_sparse.kernels import BlockLayout  # noqa: E402

DEV = torch.device("cuda")
ROWS = []


def record(out_dir, **row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "runtime.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def host_us(fn, calls=300) -> float:
    """Median over 5 rounds of the CPU time per fn() call, with the GPU busy so no call waits on it."""
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(5):
        torch.cuda._sleep(int(2e8))  # about 0.1 s of GPU time queued ahead of the calls
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per)


def syncs(fn) -> list:
    """The host-device synchronizations one fn() call makes (torch's sync debug mode)."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return [str(w.message)[:160] for w in caught]


def gpu_ms(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def section_host(out):
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    cases = {
        "vit_b global B=1, rel-pos, dense": (1, 4096, 12, 64, (64, 64), None),
        "vit_b global B=1, rel-pos, density 0.25": (1, 4096, 12, 64, (64, 64), 0.25),
        "vit_b window x25, rel-pos": (25, 196, 12, 64, (14, 14), None),
        "decoder token->image, 7 tokens": (1, 7, 8, 16, None, None),
    }
    with torch.inference_mode():
        for name, (B, N, H, D, rel, density) in cases.items():
            nk = 4096 if "decoder" in name else N
            q = torch.randn(B, N, H, D, device=DEV, dtype=bf, generator=g)
            k = torch.randn(B, nk, H, D, device=DEV, dtype=bf, generator=g)
            v = torch.randn_like(k)
            rh = rw = None
            if rel:
                rh = torch.randn(B, H, rel[0], N, device=DEV, dtype=bf, generator=g).transpose(-1, -2)
                rw = torch.randn(B, H, rel[1], N, device=DEV, dtype=bf, generator=g).transpose(-1, -2)
            layout = None
            if density:
                layout = BlockLayout.from_mask(torch.rand(1, H, 32, 32, device=DEV, generator=g) < density, 128)
            fn = lambda: block_sparse_attn(q, k, v, layout, rel_h=rh, rel_w=rw)  # noqa: E731
            record(out, section="host", case=name, host_us=round(host_us(fn), 1), gpu_ms=round(gpu_ms(fn), 4),
                   syncs=syncs(fn))
        # A whole patched module: qkv linear, rel-pos terms, the kernel, the output projection.
        for policy in ("dense", "local2d-30"):
            model = build("vit_b", DEV, bf)
            patch_sam(model, policy)
            blk = model.image_encoder.blocks[2]  # a global block
            x = torch.randn(1, 64, 64, 768, device=DEV, dtype=bf)
            fn = lambda: blk.attn(x)  # noqa: E731
            # About a dozen launches per call: 8 calls stay well inside CUDA's launch queue.
            record(out, section="host", case=f"patched vit_b global attention module, {policy}",
                   host_us=round(host_us(fn, 8), 1), gpu_ms=round(gpu_ms(fn), 4), syncs=syncs(fn))
            del model


def section_decoder(out):
    results = {}
    # Every eager run before any compiled one: compiling leaves state behind that could slow eager runs.
    for mode in ("eager", "compiled+cudagraphs"):
        for variant in ("original", "dense", "region_focused"):
            row = dict(section="decoder", variant=variant, mode=mode)
            try:
                torch._dynamo.reset()
                model, fn = decoder_call(variant)
                if mode != "eager":
                    model.mask_decoder = torch.compile(model.mask_decoder, mode="reduce-overhead")
                t = time.perf_counter()
                first = fn()[2].clone()
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t, 2)
                for _ in range(3):
                    fn()
                row["ms"] = round(wall_ms(fn, DEV, 50), 4)
                row["stable"] = bool(torch.equal(first, fn()[2]))
                results[(variant, mode)] = row["ms"]
                base = results.get(("original", "eager"))
                if base:
                    row["vs_original_eager"] = round(base / row["ms"], 3)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            record(out, **row)
            torch._dynamo.reset()


# The first call in a process of its own; where its seconds go: each shape class the tuner met (the tuner's
# _tune wrapped, a diagnostic only): its candidates, how many timings ran (none where the disk cache or a single
# candidate decided) and the seconds the class took to compile and time. A class decided without timing compiles
# in its launch, outside the tuner's seconds.
FIRST_CALL = """
import json, time, torch, sys
sys.path.insert(0, {scripts!r})
from bench_e2e import build
from sam_sparse import patch_sam
from sam_sparse.kernels import triton_attn
from sam_sparse.models import build_model
classes, tune = [], triton_attn._tune
def timed_tune(key, candidates, bench, *args, **kwargs):
    hit, runs = key in triton_attn._TUNED, []
    def counted(cfg):
        runs.append(cfg)
        return bench(cfg)
    t = time.perf_counter()
    cfg = tune(key, candidates, None if bench is None else counted, *args, **kwargs)
    if not hit:  # timings 0 with several candidates: the class came from the disk cache
        classes.append(dict(key=repr(key)[:200], candidates=len(candidates), timings=len(runs),
                            s=round(time.perf_counter() - t, 3)))
    return cfg
triton_attn._tune = timed_tune
name = {model!r}
model = (build_model(name).to("cuda", torch.bfloat16) if name.startswith("sam2")
         else build(name, torch.device("cuda"), torch.bfloat16))
handle = patch_sam(model, "dense")
handle.memory.compile_ahead = {ahead!r}
x = torch.randn(8, 3, 1024, 1024, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
t = time.perf_counter()
with torch.inference_mode():
    model.image_encoder(x)
torch.cuda.synchronize()
first = round(time.perf_counter() - t, 2)
tuned = [c for c in classes if c["timings"]]
print("FIRST", json.dumps(dict(first_forward_s=first, ahead_passes=sum(handle.memory.compiled_ahead.values()),
                               shape_classes=len(classes), tuned_classes=len(tuned),
                               candidates_timed=sum(c["candidates"] for c in tuned),
                               tuning_s=round(sum(c["s"] for c in classes), 2),
                               classes=sorted(classes, key=lambda c: -c["s"]))))
"""


def section_firstcall(out, model="vit_h"):
    scripts = os.path.dirname(os.path.abspath(__file__))
    # The patched encoder's first call compiles ahead (patches/first_call.py): the same with that off, in a fresh
    # process with caches of its own and in a next process.
    cases = [("fresh process, empty caches", "a", True, {}),
             ("fresh process, empty caches, compile_ahead off", "b", False, {}),
             ("next process, caches of the first", "a", True, {}),
             ("next process, caches of the first, compile_ahead off", "a", False, {}),
             ("next process, Triton's kernel cache only", "a", True, {"SAM_SPARSE_TUNE_CACHE": "0"})]
    with tempfile.TemporaryDirectory() as tmp:
        for label, caches, ahead, extra in cases:
            env = dict(os.environ, SAM_SPARSE_CACHE=os.path.join(tmp, caches, "ss"),
                       TRITON_CACHE_DIR=os.path.join(tmp, caches, "triton"), **extra)
            code = FIRST_CALL.format(scripts=scripts, model=model, ahead=ahead)
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("FIRST ")]
            row = dict(section="firstcall", case=f"{model} B=8 bf16 dense: {label}")
            if line:
                row.update(json.loads(line[-1][6:]))
            else:
                row["error"] = res.stderr[-500:]
            record(out, **row)


def photo() -> np.ndarray:
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.coffee()).resize((2250, 1500), Image.BICUBIC))


def time_set_and_predict(row: dict, set_image, predict) -> None:
    """row's set_image_ms (10 runs), predict_ms (30 runs) and their sum, wall ms on DEV."""
    row["set_image_ms"] = round(wall_ms(set_image, DEV, 10), 3)
    row["predict_ms"] = round(wall_ms(predict, DEV, 30), 3)
    row["total_ms"] = round(row["set_image_ms"] + row["predict_ms"], 3)


def mask_ious(masks: np.ndarray, reference: np.ndarray) -> list:
    """IoU of each bool mask (N, H, W) with the reference's of the same index, rounded to 5 digits."""
    inter = (masks & reference).sum(axis=(1, 2))
    union = np.maximum((masks | reference).sum(axis=(1, 2)), 1)
    return [round(float(x), 5) for x in inter / union]


def section_predictor(out):
    from segment_anything import SamPredictor

    from sam_sparse.predictor import set_image_on_device

    image = photo()
    point, label = np.array([[1100.0, 700.0]]), np.array([1])
    runs = [("original", "fp32", "highest", False), ("dense", "fp32", "highest", False),
            ("dense", "fp32", "high", False), ("original", "fp32", "high", False),
            ("original", "bf16-encoder", "highest", True), ("dense", "bf16-encoder", "highest", True)]
    reference = None  # masks of the first run (the original, fp32 as SAM ships it)
    for variant, dtype, precision, on_device in runs:
        row = dict(section="predictor", variant=variant, dtype=dtype, fp32_matmul_precision=precision,
                   resize="GPU (set_image_on_device)" if on_device else "SAM's CPU (PIL)")
        try:
            torch.set_float32_matmul_precision(precision)
            model = build("vit_b", DEV, torch.float32)
            if dtype == "bf16-encoder":
                model.image_encoder.to(torch.bfloat16)
            if variant != "original":
                patch_sam(model, variant)
            pred = SamPredictor(model)
            set_image = (lambda: set_image_on_device(pred, image)) if on_device else (lambda: pred.set_image(image))
            predict = lambda: pred.predict(point_coords=point, point_labels=label)  # noqa: E731
            with torch.inference_mode():
                for _ in range(2):
                    set_image()
                    masks = predict()[0]
                time_set_and_predict(row, set_image, predict)
                if not on_device:
                    row["cpu_resize_ms"] = round(wall_ms(lambda: pred.transform.apply_image(image), DEV, 10), 3)
                    # set_image without the CPU resize: what set_image does after it, timed on its own
                    resized = torch.as_tensor(pred.transform.apply_image(image), device=DEV).permute(2, 0, 1)[None]
                    row["set_torch_image_ms"] = round(
                        wall_ms(lambda: pred.set_torch_image(resized, image.shape[:2]), DEV, 10), 3)
                if reference is None:
                    reference = masks
                row["mask_iou_vs_original_fp32"] = mask_ious(masks, reference)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        finally:
            torch.set_float32_matmul_precision("highest")
        record(out, **row)


def section_sam2predictor(out, model_type="sam2.1_hiera_b+"):
    from sam_sparse.models import build_model
    from sam_sparse.patches.sam2 import image_predictor

    image = photo()
    point, label = np.array([[1100.0, 700.0]]), np.array([1])
    reference = None
    for variant in ("sam2", "dense"):
        row = dict(section="sam2predictor", model=model_type, variant=variant, autocast="bf16")
        try:
            torch.manual_seed(0)
            model = build_model(model_type).to(DEV)
            if variant != "sam2":
                patch_sam(model, variant)
            pred = image_predictor(model)
            set_image = lambda: pred.set_image(image)  # noqa: E731
            predict = lambda: pred.predict(point_coords=point, point_labels=label)  # noqa: E731
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    set_image()
                    masks = predict()[0].astype(bool)
                time_set_and_predict(row, set_image, predict)
            if reference is None:
                reference = masks
            row["mask_iou_vs_sam2"] = mask_ious(masks, reference)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        record(out, **row)


def section_precision(out):
    from oracle import oracle_attention, rel_error, same_dtype_torch

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 12, 64, device=DEV, generator=g) for _ in range(3))
    rh = torch.randn(1, 12, 4096, 64, device=DEV, generator=g)
    rw = torch.randn(1, 12, 4096, 64, device=DEV, generator=g)
    ref = oracle_attention(q, k, v, None, rh, rw)
    with torch.inference_mode():
        for precision in ("highest", "high"):
            torch.set_float32_matmul_precision(precision)
            fn = lambda: block_sparse_attn(q, k, v, rel_h=rh, rel_w=rw)  # noqa: E731
            err = rel_error(fn(), ref)
            record(out, section="precision", case=f"sam-sparse fp32, {precision}", rel_error=err,
                   ms=round(gpu_ms(fn), 4))
            base = same_dtype_torch(q, k, v, None, rh, rw)
            record(out, section="precision", case=f"PyTorch fp32 math, {precision}", rel_error=rel_error(base, ref))
        torch.set_float32_matmul_precision("highest")


def decoder_call(variant: str):
    """(model, fn): vit_b in fp32 patched with `variant` ("original": not patched), an image set, and fn
    calling predict_torch with one point (3 masks). Warmed up."""
    from segment_anything import SamPredictor

    model = build("vit_b", DEV, torch.float32)
    if variant != "original":
        patch_sam(model, variant)
    pred = SamPredictor(model)
    with torch.inference_mode():
        pred.set_image(np.random.default_rng(0).integers(0, 255, (768, 1024, 3), dtype=np.uint8))
        pt = pred.transform.apply_coords_torch(torch.tensor([[[500.0, 300.0]]], device=DEV), (768, 1024))
    lab = torch.ones(1, 1, dtype=torch.int, device=DEV)

    def fn():
        with torch.inference_mode():
            return pred.predict_torch(pt, lab, multimask_output=True)

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    return model, fn


def section_profile(out):
    """torch.profiler tables (CPU and CUDA time per op) of predict_torch, original vs dense."""
    from torch.profiler import ProfilerActivity, profile

    for variant in ("original", "dense"):
        model, fn = decoder_call(variant)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
        print(f"== predict_torch x10, vit_b fp32, {variant}\n{table}", flush=True)
        if out:
            with open(os.path.join(out, f"profile_decoder_{variant}.txt"), "w") as f:
                f.write(table)
        del model, fn


def section_pyprofile(out):
    """cProfile (Python-level time, which torch.profiler does not see) of predict_torch, original vs dense."""
    import cProfile
    import io
    import pstats

    for variant in ("original", "dense"):
        model, fn = decoder_call(variant)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
        print(f"== cProfile predict_torch x20, {variant}\n{text.getvalue()[-6000:]}", flush=True)
        del model, fn


def first_calls(out, section: str, prefix: str, fns: dict, more: int) -> None:
    """Each fn's first call timed to the device's end and recorded as "<prefix> <name>: first call" (compiling,
    in s), then `more` calls (a compiled fn's allocator settles; a graphed op captures on its second call)."""
    for case, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        record(out, section=section, case=f"{prefix} {case}: first call", s=round(time.perf_counter() - t0, 2))
        for _ in range(more):
            fn()


def interleaved(fns: dict, rounds: int = 6, calls: int = 20) -> dict:
    """Median wall ms per call of each fn, timed in alternating rounds (ABCABC...) so that drift in clocks
    or machine load hits every variant alike; also the min and max round."""
    per = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            per[name].append((time.perf_counter() - t) / calls * 1e3)
    return {n: dict(ms=round(statistics.median(v), 4), min=round(min(v), 4), max=round(max(v), 4)) for n, v in per.items()}


def section_ab(out):
    """Decoder predict_torch (fp32) and the vit_b encoder at batch 1 (bf16), eager, variants interleaved."""
    fns, keep = {}, []
    with torch.inference_mode():
        for variant in ("original", "dense", "region_focused"):
            model, fns[variant] = decoder_call(variant)
            keep.append(model)
        for name, r in interleaved(fns).items():
            record(out, section="ab", case=f"decoder predict_torch fp32, {name}", **r)
        del fns, keep
        torch.cuda.empty_cache()
        fns, keep = {}, []
        x = torch.randn(1, 3, 1024, 1024, device=DEV, dtype=torch.bfloat16)
        for variant in ("original", "dense", "local2d-30", "local2d-15"):
            model = build("vit_b", DEV, torch.bfloat16)
            if variant != "original":
                patch_sam(model, variant)
            fns[variant] = (lambda m=model.image_encoder: m(x))
            fns[variant]()
            keep.append(model)
        for name, r in interleaved(fns, calls=10).items():
            record(out, section="ab", case=f"vit_b encoder B=1 bf16 eager, {name}", **r)


def sam2_pair(model: str):
    """sam2's model of type `model` (random weights, bf16, on the GPU, eval mode) and a deep copy of it patched
    with dense."""
    import copy

    from sam_sparse.models import build_model

    if not model.startswith("sam2"):
        raise ValueError(f"expected a SAM 2.1 model type (sam2.1_hiera_t / s / b+ / l), not {model!r}")
    base = build_model(model).to(DEV, torch.bfloat16)
    patched = copy.deepcopy(base)
    patch_sam(patched, "dense")
    return base, patched


def section_sam2ab(out, model="sam2.1_hiera_b+,sam2.1_hiera_l"):
    """SAM 2.1 image encoders at batch 1 (bf16), sam2's own against patched dense, eager and compiled (default
    mode), the patched one with its batch-1 CUDA graph (patch_sam's default: under torch.compile one op that
    replays the encoder compiled) and without (graph_encoder off), the six timed in alternating rounds in one
    process, after a first call each (timed: compiling): batch 1 is host-bound, and this machine's
    host speed drifts between runs and within one (side_by_side's rows, timed one after another, moved by up
    to 1.5x for the same code: runs 77 and 79), so only interleaved rounds give a ratio that holds."""
    for name in model.split(","):
        base, patched = sam2_pair(name)
        x = torch.randn(1, 3, 1024, 1024, device=DEV, dtype=torch.bfloat16)
        torch._dynamo.reset()
        with torch.inference_mode():
            fns = {}
            switch = patched._sam_sparse_handle.memory  # graph_encoder: the patched encoder's batch-1 CUDA graph

            def graph(on: bool, fn):
                def call():
                    switch.graph_encoder = on
                    return fn()
                return call

            for label, m in (("sam2", base), ("patched dense", patched)):
                enc = m.image_encoder
                fns[f"{label}, eager"] = graph(True, lambda e=enc: e(x))
                fns[f"{label}, compiled"] = graph(True, lambda e=torch.compile(enc): e(x))
            fns["patched dense, eager, graph_encoder off"] = graph(False, lambda e=patched.image_encoder: e(x))
            # the same compiled encoder with its op off: traced into the caller's graph, 48 attention ops
            compiled = torch.compile(patched.image_encoder)
            fns["patched dense, compiled, graph_encoder off"] = graph(False, lambda e=compiled: e(x))
            first_calls(out, "sam2ab", f"{name} B=1", fns, more=2)
            res = interleaved(fns, rounds=10, calls=20)
            for case, r in res.items():
                record(out, section="sam2ab", case=f"{name} image encoder B=1 bf16, {case}", **r)
            for mode in ("eager", "compiled", "eager, graph_encoder off", "compiled, graph_encoder off"):
                record(out, section="sam2ab", case=f"{name} B=1 {mode}: sam2 / patched dense",
                       ratio=round(res[f"sam2, {mode.split(',')[0]}"]["ms"] / res[f"patched dense, {mode}"]["ms"], 3))
            # Both compiled with CUDA graphs (mode="reduce-overhead"): the host's launch costs gone on both sides,
            # what is left is GPU time. Timed apart from the rows above: cudagraph trees own their outputs. The
            # patched encoder as patch_sam leaves it (graph_encoder on: its op, which cudagraph trees leave to run).
            switch.graph_encoder = True
            try:
                ro = {label: torch.compile(m.image_encoder, mode="reduce-overhead")
                      for label, m in (("sam2", base), ("patched dense", patched))}
                ro_fns = {f"{label}, compiled reduce-overhead": (lambda e=e: e(x)) for label, e in ro.items()}
                for fn in ro_fns.values():
                    for _ in range(3):  # compile, warm up, record
                        fn()
                res = interleaved(ro_fns, rounds=10, calls=20)
                for case, r in res.items():
                    record(out, section="sam2ab", case=f"{name} image encoder B=1 bf16, {case}", **r)
                record(out, section="sam2ab", case=f"{name} B=1 compiled reduce-overhead: sam2 / patched dense",
                       ratio=round(res["sam2, compiled reduce-overhead"]["ms"]
                                   / res["patched dense, compiled reduce-overhead"]["ms"], 3))
            except Exception as e:  # noqa: BLE001  a row that cannot run says why
                record(out, section="sam2ab", case=f"{name} B=1 compiled reduce-overhead",
                       error=f"{type(e).__name__}: {str(e)[:300]}")
        del base, patched, fns
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def section_sam2b8(out, model="sam2.1_hiera_b+,sam2.1_hiera_l", batch=8):
    """SAM 2.1 image encoders at batch 8 (bf16), sam2's own against patched dense, eager and compiled (default
    mode), after two calls each (the first compiles; its time is recorded), then timed in alternating rounds."""
    for name in model.split(","):
        base, patched = sam2_pair(name)
        x = torch.randn(batch, 3, 1024, 1024, device=DEV, dtype=torch.bfloat16)
        torch._dynamo.reset()
        with torch.inference_mode():
            fns = {}
            for label, m in (("sam2", base), ("patched dense", patched)):
                fns[f"{label}, eager"] = lambda e=m.image_encoder: e(x)
                fns[f"{label}, compiled"] = lambda e=torch.compile(m.image_encoder): e(x)
            first_calls(out, "sam2b8", f"{name} B={batch}", fns, more=1)
            res = interleaved(fns, rounds=10, calls=5)
            for case, r in res.items():
                record(out, section="sam2b8", case=f"{name} image encoder B={batch} bf16, {case}", **r)
            for mode in ("eager", "compiled"):
                record(out, section="sam2b8", case=f"{name} B={batch} {mode}: sam2 / patched dense",
                       ratio=round(res[f"sam2, {mode}"]["ms"] / res[f"patched dense, {mode}"]["ms"], 4))
            # The compiled pair again by GPU events (L2 cleared before each call, the host ahead of the GPU), as
            # side_by_side times it, in alternating rounds: whether the methods or the processes differ (runs 116-118).
            compiled = [case for case in fns if case.endswith("compiled")]
            events = {case: [] for case in compiled}
            for _ in range(3):
                for case in compiled:
                    events[case].append(do_bench(fns[case], warmup=5, rep=200, return_mode="median"))
            for case, ms in events.items():
                record(out, section="sam2b8", case=f"{name} image encoder B={batch} bf16, {case}, GPU events",
                       ms=round(statistics.median(ms), 4), min=round(min(ms), 4), max=round(max(ms), 4))
            record(out, section="sam2b8", case=f"{name} B={batch} compiled, GPU events: sam2 / patched dense",
                   ratio=round(statistics.median(events["sam2, compiled"])
                               / statistics.median(events["patched dense, compiled"]), 4))
            # Where a wall-clock round (synchronized, starting from an idle GPU) and GPU events differ: the host's
            # time per call with the GPU kept busy, and any call that waits on the GPU.
            for case in compiled:
                record(out, section="sam2b8", case=f"{name} image encoder B={batch} bf16, {case}, host",
                       host_us=round(host_us(fns[case], calls=1), 1), syncs=syncs(fns[case]))
        del base, patched, fns
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def section_compiledhost(out, model="sam2.1_hiera_l"):
    """Host and GPU time per call under torch.compile (default mode, no CUDA graphs) at batch 1, sam2's own
    Hiera blocks against the patched ones: one windowed block of stage 3, one global block, and the whole
    image encoder. Where host_us exceeds gpu_ms * 1000 the call is host-bound (issue 22's batch-1 compiled
    row, run 64: patched dense 13.78 ms against sam2's 8.36 with less GPU time). A call that waits on the GPU
    (sam2's encoder does, once per forward: run 67) reads host_us as the queued GPU time instead."""
    base, patched = sam2_pair(model)
    trunk = base.image_encoder.trunk
    global_ = next(i for i, b in enumerate(trunk.blocks) if b.window_size == 0)  # stage 3, 64 x 64 tokens
    stage3 = trunk.blocks[global_].dim
    windowed = next(i for i, b in enumerate(trunk.blocks) if b.window_size and b.pool is None and b.dim == stage3)
    x = torch.randn(1, 3, 1024, 1024, device=DEV, dtype=torch.bfloat16)
    with torch.inference_mode():
        for label, m in (("sam2", base), ("patched dense", patched)):
            blocks = m.image_encoder.trunk.blocks
            for name, i in (("windowed", windowed), ("global", global_)):
                blk = blocks[i]
                h = torch.randn(1, 64, 64, blk.dim, device=DEV, dtype=torch.bfloat16)
                torch._dynamo.reset()
                fn = torch.compile(blk)
                fn(h)
                call = lambda f=fn, h=h: f(h)  # noqa: E731
                record(out, section="compiledhost", case=f"{model} block {i} ({name}, window {blk.window_size}), {label}",
                       host_us=round(host_us(call, 8), 1), gpu_ms=round(gpu_ms(call), 4))
            torch._dynamo.reset()
            enc = torch.compile(m.image_encoder)
            enc(x)
            call = lambda f=enc: f(x)  # noqa: E731
            record(out, section="compiledhost", case=f"{model} image encoder B=1, {label}",
                   host_us=round(host_us(call, 2), 1), gpu_ms=round(gpu_ms(call), 4))
    torch._dynamo.reset()
    host_parts(out, patched)
    profile_compiled(out, patched, x)


def section_hostparts(out, model="sam2.1_hiera_l"):
    """host_parts alone (compiledhost runs it after its compiled blocks and encoders): one attention call's host
    time by part, on the patched model's Hiera shapes at batch 1."""
    _, patched = sam2_pair(model)
    host_parts(out, patched)


_TWINS: dict = {}


def customop_twin(name: str, impl):
    """The op sam_sparse::name as it was defined up to run 76, through torch.library.custom_op, around the same
    implementation: what that layer costs a compiled graph, beside the op as defined now, in the same run."""
    if name not in _TWINS:
        op = torch.library.custom_op(f"sam_sparse_bench::{name}", impl, mutates_args=())
        op.register_fake(lambda q, *rest: q.new_empty(q.shape))
        _TWINS[name] = op
    return _TWINS[name]


def host_parts(out, patched):
    """Where one attention call's host time goes, on the shapes of `patched`'s Hiera stages at batch 1:
    the public function (eager fast path), the torch op that compiled graphs call (under inference_mode and
    under no_grad, as sam2's predictors run; and its torch.library.custom_op twin), the plan alone, its
    argument assembly (TMA descriptors included) and the compiled kernel's launcher alone. A diagnostic: it
    reaches into the plan cache and the plan's parts on purpose."""
    from sam_sparse.kernels import interface, window_attn

    bf = torch.bfloat16
    trunk = patched.image_encoder.trunk
    seen = set()
    for i, blk in enumerate(trunk.blocks):
        a = blk.attn
        nh, hd = a.num_heads, a.dim_out // a.num_heads
        key = (blk.window_size, nh, hd)
        if key in seen or a.q_pool is not None:  # pooled blocks: 3 of 48, on the windowed path
            continue
        seen.add(key)
        grid = 256 >> sum(1 for b in trunk.blocks[:i + 1] if b.attn.q_pool is not None)  # 1024 px / 4 per side
        q, k, v = (torch.randn(1, grid, grid, nh, hd, device=DEV, dtype=bf) for _ in range(3))
        if blk.window_size:
            w = blk.window_size
            call = lambda q=q, k=k, v=v, w=w: window_attn(q, k, v, (w, w), k_pad=k[0, 0, 0], v_pad=v[0, 0, 0])  # noqa: E731
            op_args = (q, k, v, k[0, 0, 0], v[0, 0, 0], None, None, None, None, [w, w], [w, w], hd ** -0.5, 128)
            op = lambda a=op_args: torch.ops.sam_sparse.window_attn.default(*a)  # noqa: E731
            twin = lambda a=op_args, t=customop_twin("window_attn", interface._window_impl): t(*a)  # noqa: E731
            args = (q, k, v, None, None, None, None, None, None, k[0, 0, 0], v[0, 0, 0])
        else:
            q, k, v = (t.view(1, grid * grid, nh, hd) for t in (q, k, v))
            call = lambda q=q, k=k, v=v: block_sparse_attn(q, k, v)  # noqa: E731
            op_args = (q, k, v, None, None, None, None, None, hd ** -0.5, 128)
            op = lambda a=op_args: torch.ops.sam_sparse.block_sparse_attn.default(*a)  # noqa: E731
            twin = lambda a=op_args, t=customop_twin("block_sparse_attn", interface._attn_impl): t(*a)  # noqa: E731
            args = (q, k, v, None, None, None, None, None, None)
        with torch.inference_mode():
            call()
            plan = list(interface._PLANS.values())[-1]
            plans = getattr(plan, "plans", [plan])
            row = dict(section="hostparts", case=f"block {i}: window {blk.window_size}, {grid}x{grid} tokens, "
                       f"{nh} heads x {hd}", launches=len(plans), config=str(plans[0].config)[:200],
                       tma=plans[0]._tma is not None, split=plans[0].split is not None,
                       public_us=round(host_us(call), 1), op_us=round(host_us(op), 1),
                       op_customop_us=round(host_us(twin), 1), plan_us=round(host_us(lambda: plan(*args)), 1))
            p0 = plans[0]
            out_t = torch.empty_like(q)
            ws = p0.split.workspace(q.device) if p0.split is not None else None
            tens = lambda absent=None: p0._tensors(q, k, v, out_t, ws, *args[9:11] if len(args) > 9 else (None, None),  # noqa: E731
                                                   None, None, None, None, None, None, absent)
            row["args_us"] = round(host_us(tens), 1)
            t, t_q = tens(), tens(q)
            # The launcher with None for the absent tensors (as plans launch) and with q standing in for them
            # (as they launched up to run 82): each tensor argument costs it a data_ptr() call and a driver query.
            row["launcher_us"] = round(host_us(lambda: p0._fast(*t, *p0._tail)), 1)
            row["launcher_standins_us"] = round(host_us(lambda: p0._fast(*t_q, *p0._tail)), 1)
            row["empty_us"] = round(host_us(lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device)), 1)
        with torch.no_grad():
            row["op_no_grad_us"] = round(host_us(op), 1)
            row["op_customop_no_grad_us"] = round(host_us(twin), 1)
        record(out, **row)


def profile_compiled(out, patched, x, calls=20):
    """cProfile of the patched encoder compiled (default mode) at batch 1: the Python functions its host
    time goes to (Inductor's wrapper, the op dispatch, sam_sparse, Triton's launcher)."""
    import cProfile
    import io
    import pstats

    torch._dynamo.reset()
    with torch.inference_mode():
        enc = torch.compile(patched.image_encoder)
        enc(x)
        enc(x)
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            enc(x)
        prof.disable()
        torch.cuda.synchronize()
    for sort in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats(sort).print_stats(30)
        body = text.getvalue()
        print(f"== cProfile compiled patched encoder x{calls}, by {sort}\n{body[-7000:]}", flush=True)
        if out:
            with open(os.path.join(out, f"cprofile_compiled_{sort}.txt"), "w") as f:
                f.write(body)
    torch._dynamo.reset()


SECTIONS = {"host": section_host, "precision": section_precision, "decoder": section_decoder,
            "predictor": section_predictor, "firstcall": section_firstcall, "profile": section_profile,
            "pyprofile": section_pyprofile, "ab": section_ab, "sam2predictor": section_sam2predictor,
            "compiledhost": section_compiledhost, "hostparts": section_hostparts, "sam2ab": section_sam2ab,
            "sam2b8": section_sam2b8}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for runtime.jsonl (default $OUT)")
    ap.add_argument("--model", default="vit_h", help="firstcall's model type (vit_h, sam2.1_hiera_l, ...)")
    ap.add_argument("--sam2-model", default="sam2.1_hiera_b+",
                    help="the SAM 2.1 model type of sam2predictor, compiledhost and hostparts; a comma list for sam2ab and sam2b8")
    args = ap.parse_args()
    options = {"firstcall": dict(model=args.model), "sam2predictor": dict(model_type=args.sam2_model),
               "compiledhost": dict(model=args.sam2_model), "hostparts": dict(model=args.sam2_model),
               "sam2ab": dict(model=args.sam2_model), "sam2b8": dict(model=args.sam2_model)}
    import triton

    record(args.out, section="meta", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
           triton=triton.__version__, date=time.strftime("%Y-%m-%d"))
    for name in args.only.split(","):
        try:
            SECTIONS[name](args.out, **options.get(name, {}))
        except Exception as e:  # one failing section must not lose the others' numbers
            record(args.out, section=name, error=f"{type(e).__name__}: {e}"[:500])


if __name__ == "__main__":
    main()
