"""End-to-end benchmark: SAM's whole image encoder, original vs patched, eager and torch.compile.

For each model (random weights, rel-pos randomized so the bias is real work), batch and mode:
  original          segment-anything as is
  sdpa+bias         original with its attention core on F.scaled_dot_product_attention, the rel-pos
                    bias materialized as an additive (B, nH, N, N) attn_mask (what most ports do)
  <policy>          sam_sparse.patch_sam(model, policy): "dense" and sparse built-in policies
Reported: median ms (triton.testing.do_bench on CUDA, after warm-up; perf_counter on CPU), images/s,
peak GPU memory (torch.cuda.max_memory_allocated after a reset, weights included), output cosine vs the
eager original, and the mean block density of the patched global blocks. Then the full predictor path
for one image (set_image + predict_torch with one point) per variant, eager, and with the encoder
compiled in each of --predictor-compile-modes. Everything is measured in
one run, so ratios between rows are valid. A markdown table is printed last; full results go to --out
as JSON (default $OUT/bench_e2e.json when OUT is set).

    python scripts/bench_e2e.py                           # vit_b, vit_h; batch 1, 8; bf16; eager + compile
    python scripts/bench_e2e.py --models vit_b --batches 1 --no-compile
    python scripts/bench_e2e.py --quick                   # tiny model, a CPU smoke test (< 1 min)
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
import time
import traceback
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything import SamPredictor, sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention as EncoderAttention
from segment_anything.modeling.image_encoder import get_rel_pos

from sam_sparse import patch_sam
from sam_sparse.policy import load_policy

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# torch.compile mode -> the row's "mode" column ("default" keeps the label earlier runs used)
MODE_LABELS = {None: "eager", "default": "compile", "reduce-overhead": "compile+cudagraphs"}


# ---------------------------------------------------------------------------------------------------
# The SDPA + materialized-bias baseline: a patch of segment-anything's Attention.forward
# ---------------------------------------------------------------------------------------------------


class SDPABiasAttention(EncoderAttention):
    """SAM's encoder Attention with its core on SDPA; the decomposed rel-pos terms are summed into an
    (B, nH, N, N) additive mask, as SAM's add_decomposed_rel_pos would, then passed as attn_mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nH, N, hd)
        bias = None
        if self.use_rel_pos:
            Rh = get_rel_pos(H, H, self.rel_pos_h)
            Rw = get_rel_pos(W, W, self.rel_pos_w)
            r_q = q.reshape(B, self.num_heads, H, W, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.num_heads, H * W, H * W)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        x = x.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


@contextlib.contextmanager
def sdpa_bias(model):
    mods = [m for m in model.modules() if type(m) is EncoderAttention]
    for m in mods:
        m.__class__ = SDPABiasAttention
    try:
        yield None
    finally:
        for m in mods:
            m.__class__ = EncoderAttention


@contextlib.contextmanager
def original(model):
    yield None


@contextlib.contextmanager
def patched(model, policy):
    handle = patch_sam(model, policy)
    try:
        yield handle
    finally:
        handle.restore()


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


def tiny_sam():
    """A SAM-shaped model small enough for a CPU smoke test: 256 px, 4 blocks, 2 global."""
    enc = ImageEncoderViT(img_size=256, depth=4, embed_dim=128, num_heads=4, mlp_ratio=4.0, out_chans=256,
                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=7,
                          global_attn_indexes=(1, 3))
    return Sam(enc, PromptEncoder(embed_dim=256, image_embedding_size=(16, 16), input_image_size=(256, 256),
                                  mask_in_chans=16),
               MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                   depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256))


def build(name: str, device, dtype):
    torch.manual_seed(0)
    model = tiny_sam() if name == "tiny" else sam_model_registry[name]()
    with torch.no_grad():  # SAM zero-initializes these: randomize so the bias is not a no-op
        for n, p in model.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.5)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, warmup: int, rep_ms: int, iters: int) -> float:
    """Median ms of fn(): triton.testing.do_bench on CUDA (warm-up and rep in ms), perf_counter on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup, rep=rep_ms, return_mode="median"))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def wall_ms(fn, device, iters: int) -> float:
    """Median wall ms of fn() including host work (the predictor path resizes on the CPU)."""
    times = []
    for _ in range(iters):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def global_density(handle) -> float | None:
    if handle is None:
        return None
    d = [r.density for r in handle.report if r.kind == "encoder.global" and r.density is not None]
    return sum(d) / len(d) if d else None


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------


def variants(policies):
    out = [("original", original), ("sdpa+bias", sdpa_bias)]
    out += [(p, partial(patched, policy=load_policy(p))) for p in policies]
    return out


def time_encoder_modes(args, model, model_name, batch, dtype, device, modes, rows):
    encoder = model.image_encoder
    size = encoder.img_size
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        ref = encoder(x).float()  # the eager original: the cosine reference
    for compile_mode in modes:
        compiled = compile_mode is not None
        for label, ctx in variants(args.policies):
            row = dict(model=model_name, batch=batch, dtype=args.dtype, variant=label,
                       mode=MODE_LABELS.get(compile_mode, compile_mode), device=str(device))
            try:
                with ctx(model) as handle:
                    fn = encoder
                    if compiled:
                        torch._dynamo.reset()
                        fn = torch.compile(encoder, backend=args.compile_backend,
                                           mode=None if compile_mode == "default" else compile_mode)
                    with torch.inference_mode():
                        t = time.perf_counter()
                        out = fn(x)
                        sync(device)
                        row["first_call_s"] = round(time.perf_counter() - t, 2)
                        for _ in range(args.warm_calls):
                            out = fn(x)
                        # CUDA-graph outputs are overwritten by the next replay: keep a copy
                        out = out.float().clone()
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        ms = time_ms(lambda: fn(x), device, args.warmup, args.rep, args.iters)
                        if device.type == "cuda":
                            row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
                    row.update(ms=round(ms, 3), images_per_s=round(batch * 1e3 / ms, 2),
                               cosine=round(cosine(out.float(), ref), 6), density=global_density(handle))
            except Exception as e:  # one failing variant must not lose the others' numbers
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            finally:
                if compiled:
                    torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)


def bench_predictor(args, model, model_name, device, rows):
    """set_image + predict_torch (one point, 3 masks) on one image, per variant, eager."""
    import skimage.data

    image = skimage.data.astronaut()
    if model.image_encoder.img_size < 1024:
        image = image[::2, ::2].copy()
    predictor = SamPredictor(model)
    point = torch.tensor([[[image.shape[1] / 2, image.shape[0] / 2]]], device=device)
    point = predictor.transform.apply_coords_torch(point, image.shape[:2])
    labels = torch.ones(1, 1, dtype=torch.int, device=device)
    dtype = next(model.parameters()).dtype

    def predict():
        # segment-anything's PromptEncoder multiplies fp32 coords by its own weights: autocast makes
        # that work for half-precision models (with or without patching).
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return predictor.predict_torch(point, labels, multimask_output=True)

    def run():
        predictor.set_image(image)
        return predict()

    encoder = model.image_encoder
    for compile_mode in [None] + args.predictor_compile_modes:
        for label, ctx in variants(args.policies):
            row = dict(model=model_name, batch=1, dtype=args.dtype, variant=label,
                       mode="predictor-" + MODE_LABELS.get(compile_mode, compile_mode), device=str(device))
            try:
                with ctx(model), torch.inference_mode():
                    if compile_mode is not None:
                        # what docs/patching.md tells batch-1 users to do
                        torch._dynamo.reset()
                        model.image_encoder = torch.compile(
                            encoder, backend=args.compile_backend, mode=None if compile_mode == "default" else compile_mode)
                    t = time.perf_counter()
                    masks = run()[0].clone()
                    row["first_call_s"] = round(time.perf_counter() - t, 2)
                    for _ in range(args.warm_calls):
                        run()
                    n = args.iters if args.quick else max(3, args.iters)
                    ms = wall_ms(run, device, n)
                    # the split: set_image (preprocessing + encoder) and predict_torch (prompt encoder + decoder)
                    row["set_image_ms"] = round(wall_ms(lambda: predictor.set_image(image), device, n), 3)
                    row["predict_ms"] = round(wall_ms(predict, device, n), 3)
                    again = run()[0]
                    row.update(ms=round(ms, 3), images_per_s=round(1e3 / ms, 2),
                               masks_stable=bool(torch.equal(masks, again)))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            finally:
                model.image_encoder = encoder
                if compile_mode is not None:
                    torch._dynamo.reset()
            rows.append(row)
            print(json.dumps(row), flush=True)


def markdown(rows) -> str:
    base = {}
    for r in rows:
        if r["variant"] == "original" and "ms" in r:
            base[(r["model"], r["batch"], r["mode"])] = r["ms"]
    head = "| model | batch | mode | variant | ms | images/s | vs original | peak GB | cosine | global density |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        b = base.get((r["model"], r["batch"], r["mode"]))
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['variant']} | error: {r['error'][:60]} |  |  |  |  |  |")
            continue
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['variant']} | {r['ms']:.2f} | {r['images_per_s']:.1f} | "
            f"{fmt(b / r['ms'] if b else None, '.2f')}x | {fmt(r.get('peak_mem_gb'), '.2f')} | "
            f"{fmt(r.get('cosine'), '.5f')} | {fmt(r.get('density'), '.3f')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="vit_b,vit_h", help="comma list of vit_b, vit_l, vit_h, tiny")
    ap.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--policies", default="dense,local2d-30,local2d-15",
                    help="comma list of sam-sparse policies (names or YAML paths) to patch with")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-modes", default="default",
                    help="comma list of torch.compile modes: default, reduce-overhead (CUDA graphs), max-autotune, ...")
    ap.add_argument("--no-predictor", action="store_true", help="skip the set_image + predict path")
    ap.add_argument("--predictor-compile-modes", default="",
                    help="also time the predictor path with its image encoder compiled in these modes (comma list)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    ap.add_argument("--rep", type=int, default=500, help="do_bench repetition time, ms")
    ap.add_argument("--iters", type=int, default=5, help="timed runs on CPU and for the predictor path")
    ap.add_argument("--warm-calls", type=int, default=2, help="untimed calls after the first (compiling) one")
    ap.add_argument("--device", default=None, help="default cuda if available, else cpu")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model, batch 1, fp32 on CPU, compile with aot_eager: a smoke test in < 1 min")
    ap.add_argument("--out", default=None, help="JSON file (default $OUT/bench_e2e.json when OUT is set)")
    args = ap.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        args.models, args.batches, args.iters, args.warm_calls = "tiny", "1", 1, 0
        if device.type == "cpu":
            args.dtype, args.compile_backend = "fp32", "aot_eager"  # no C++ build in a smoke test
    args.policies = [p for p in args.policies.split(",") if p]
    args.predictor_compile_modes = [m for m in args.predictor_compile_modes.split(",") if m]
    dtype = DTYPES[args.dtype]
    modes = [None] + ([] if args.no_compile else [m for m in args.compile_modes.split(",") if m])
    out_path = args.out or (os.path.join(os.environ["OUT"], "bench_e2e.json") if os.environ.get("OUT") else None)

    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                python=platform.python_version(), device=str(device), argv=sys.argv[1:],
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta), flush=True)
    rows = []
    t0 = time.time()
    for name in args.models.split(","):
        model = build(name, device, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            time_encoder_modes(args, model, name, batch, dtype, device, modes, rows)
        if not args.no_predictor:
            bench_predictor(args, model, name, device, rows)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta["seconds"] = round(time.time() - t0, 1)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print(f"wrote {out_path}")
    print()
    print(f"Image encoder, random weights, {args.dtype}, {meta['gpu']} ({meta['device']}); medians"
          f"{' (CPU: PyTorch reference path, not the kernel)' if device.type == 'cpu' else ''}.")
    print(markdown(rows))


if __name__ == "__main__":
    main()
