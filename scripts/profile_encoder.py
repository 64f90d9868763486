"""Where the compiled image encoder's GPU time goes: attention kernels, GEMMs, everything else.

For each model (random weights, rel-pos randomized: SAM initializes it to zero) and configuration
(segment-anything unpatched, sam-sparse dense, a sparse policy), the image encoder is compiled with
torch.compile, warmed up, then profiled for --iters forwards with torch.profiler (CUDA activity). Every
GPU kernel is put in one class by its name:
  attention  sam-sparse's Triton kernel (_attn_fwd), SDPA / flash / cuDNN / efficient-attention kernels,
             and unpatched SAM's softmax over the N x N logits (SAM 2's Hiera calls SDPA)
  gemm       cuBLAS / CUTLASS / cuDNN matmul and convolution kernels, and Inductor's mm templates
  other      everything else (Inductor's fused pointwise and reductions: LayerNorm, GELU, the rel-pos
             einsums' glue, window pad / partition copies, permutes)
and the table gives GPU ms per forward and the share of each class, plus the top kernels. The point is
to see the next bottleneck (issue 14), not to benchmark: bench_e2e.py times whole forwards.

--per-block (eager) profiles each transformer block of the encoder on its own, with the input it gets in
a forward, unpatched and patched: which layers' attention the kernel wins or loses (Hiera's windows of
64, 16 and 4 queries, its pooled blocks, its global blocks), in a second table.

    python scripts/profile_encoder.py --models vit_b --batch 8 --out $OUT/profile
    python scripts/profile_encoder.py --models sam2.1_hiera_b+,sam2.1_hiera_l --batch 8   # SAM 2's encoder
    python scripts/profile_encoder.py --models sam2.1_hiera_b+ --per-block   # attention per block, eager
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch
from segment_anything import sam_model_registry

from sam_sparse import patch_sam

CLASSES = ("attention", "gemm", "other")
_ATTENTION = re.compile(r"_attn_fwd|flash|fmha|sdpa|attention|cudnn_generated_fort_native_sdpa|softmax", re.I)
_GEMM = re.compile(r"gemm|cutlass|cublas|xmma|sm\d+_.*_tn|nvjet|conv|triton_tem_fused|_mm_|mm_kernel|implicit", re.I)


def kernel_class(name: str) -> str:
    if _ATTENTION.search(name):
        return "attention"
    if _GEMM.search(name):
        return "gemm"
    return "other"


def build_encoder(name: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    if name.startswith("sam2"):  # SAM 2.1: sam2's build_sam2, its image encoder (Hiera + FPN neck)
        from sam_sparse.models import build_model

        return build_model(name).image_encoder.to("cuda", dtype).eval()
    sam = sam_model_registry[name](checkpoint=None)
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.02)
    return sam.image_encoder.to("cuda", dtype).eval()


def gpu_profile(fn, iters: int, top: int = 12) -> dict:
    """fn() run `iters` times under torch.profiler (CUDA activity; warm fn up first): GPU ms per call in
    all, by kernel class (kernel_class), the `top` kernels, and the wall ms per call (wall much above the
    GPU total: the host sets the pace)."""
    import time

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3 / iters
    per_kernel = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[ev.name] += ev.device_time_total / 1000 / iters  # ms per call
    by_class = {c: 0.0 for c in CLASSES}
    for name, ms in per_kernel.items():
        by_class[kernel_class(name)] += ms
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return dict(total_ms=sum(by_class.values()), wall_ms=wall, by_class=by_class,
                top=[(kernel_class(n), n[:90], ms) for n, ms in ranked])


def top_table(rows: list, title) -> list:
    """Markdown lines: per row, its top kernels (gpu_profile's `top`) under title(row)."""
    lines = []
    for r in rows:
        lines += ["", f"Top kernels, {title(r)} (ms per call):", "", "| class | kernel | ms |", "|---|---|---:|"]
        lines += [f"| {c} | `{n}` | {ms:.3f} |" for c, n, ms in r["top"]]
    return lines


def profile(encoder, x, iters: int, mode: str, top: int = 12) -> dict:
    compiled = encoder if mode == "eager" else torch.compile(encoder, mode=None if mode == "default" else mode)
    with torch.inference_mode():
        for _ in range(3):
            compiled(x)
        return gpu_profile(lambda: compiled(x), iters, top)


def encoder_blocks(encoder) -> list:
    """The encoder's transformer blocks in order: Hiera's trunk.blocks, or the ViT's blocks."""
    trunk = getattr(encoder, "trunk", encoder)
    return list(trunk.blocks)


def block_inputs(encoder, x) -> list:
    """Each block's input in one forward of encoder(x)."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone())) for b in encoder_blocks(encoder)]
    try:
        with torch.inference_mode():
            encoder(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def block_shape(block) -> str:
    """What a block attends: window (0: global), query pooling, heads x head dim."""
    attn = block.attn
    heads = attn.num_heads
    dim = getattr(attn, "dim_out", None) or attn.qkv.weight.shape[0] // 3
    window = getattr(block, "window_size", 0)
    pooled = " pooled" if getattr(attn, "q_pool", None) is not None else ""
    return f"{'window ' + str(window) if window else 'global'}{pooled}, {heads} x {dim // heads}"


def per_block(name: str, dtype, batch: int, policy: str, iters: int) -> list:
    """Eager GPU ms per block (all kernels, and attention kernels alone), unpatched and patched with policy."""
    x = torch.randn(batch, 3, 1024, 1024, device="cuda", dtype=dtype)
    encoder = build_encoder(name, dtype)
    inputs = block_inputs(encoder, x)
    blocks = encoder_blocks(encoder)
    rows = [dict(block=i, shape=block_shape(b), tokens="x".join(map(str, inp.shape[1:3])))
            for i, (b, inp) in enumerate(zip(blocks, inputs))]
    handle = patch_sam(encoder, policy)
    for config in ("unpatched", policy):
        with torch.inference_mode(), (handle.disabled() if config == "unpatched" else contextlib.nullcontext()):
            for row, b, inp in zip(rows, blocks, inputs):
                for _ in range(3):
                    b(inp)
                p = gpu_profile(lambda: b(inp), iters)
                row[config] = dict(total=p["total_ms"], attention=p["by_class"]["attention"])
    handle.restore()
    return rows


def per_block_markdown(name: str, policy: str, rows: list) -> str:
    lines = ["", f"{name}, per block (eager, GPU ms per call of the block; attention = attention kernels only):", "",
             f"| block | attends | tokens in | unpatched all | {policy} all | unpatched attention | {policy} attention "
             f"| attention ratio |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        u, p = r["unpatched"], r[policy]
        lines.append(f"| {r['block']} | {r['shape']} | {r['tokens']} | {u['total']:.3f} | {p['total']:.3f} | "
                     f"{u['attention']:.3f} | {p['attention']:.3f} | {u['attention'] / max(p['attention'], 1e-9):.2f}x |")
    su = sum(r["unpatched"]["attention"] for r in rows)
    sp = sum(r[policy]["attention"] for r in rows)
    lines.append(f"| all | | | {sum(r['unpatched']['total'] for r in rows):.3f} | {sum(r[policy]['total'] for r in rows):.3f} "
                 f"| {su:.3f} | {sp:.3f} | {su / max(sp, 1e-9):.2f}x |")
    return "\n".join(lines) + "\n"


def markdown(meta: dict, rows: list) -> str:
    lines = [f"Image encoder, GPU time per forward by kernel class ({meta['gpu']}, {meta['dtype']}, "
             f"batch {meta['batch']}, torch.compile mode {meta['mode']} (eager: not compiled), {meta['iters']} profiled "
             f"forwards; "
             f"commit {meta['commit']}, {meta['date']}).", "",
             "| model | config | wall ms | GPU ms | attention | gemm | other |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r["total_ms"]
        shares = " | ".join(f"{r['by_class'][c]:.2f} ({r['by_class'][c] / t:.0%})" for c in CLASSES)
        lines.append(f"| {r['model']} | {r['config']} | {r['wall_ms']:.2f} | {t:.2f} | {shares} |")
    lines += top_table(rows, lambda r: f"{r['model']} {r['config']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vit_b", help="comma list of vit_b, vit_l, vit_h, sam2.1_hiera_*")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--policy", default=None,
                    help="the sparse configuration's policy (default local2d-30; with --per-block, dense)")
    ap.add_argument("--mode", default="default",
                    help="torch.compile mode (default, max-autotune-no-cudagraphs), or eager: no compile")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--top", type=int, default=12, help="kernels listed per configuration, by GPU time")
    ap.add_argument("--configs", default=None,
                    help="comma list of the configurations to profile (default unpatched,dense,--policy)")
    ap.add_argument("--per-block", action="store_true",
                    help="profile each block on its own, eager, unpatched vs --policy (default dense here)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "profile")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (the profile is of GPU kernels)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    meta = dict(gpu=torch.cuda.get_device_name(), dtype=args.dtype, batch=args.batch, mode=args.mode,
                iters=args.iters, torch=torch.__version__, commit=os.environ.get("SAM_SPARSE_COMMIT", "unknown"),
                date=datetime.date.today().isoformat())
    args.out.mkdir(parents=True, exist_ok=True)
    if args.per_block:
        policy = args.policy or "dense"
        text = ""
        for name in args.models.split(","):
            rows = per_block(name, dtype, args.batch, policy, args.iters)
            text += per_block_markdown(name, policy, rows)
            (args.out / "per_block.md").write_text(f"{meta}\n" + text)
            torch.cuda.empty_cache()
        print(text)
        return 0
    rows = []
    for name in args.models.split(","):
        x = torch.randn(args.batch, 3, 1024, 1024, device="cuda", dtype=dtype)
        for config in (args.configs.split(",") if args.configs else ("unpatched", "dense", args.policy or "local2d-30")):
            encoder = build_encoder(name, dtype)
            if config != "unpatched":
                patch_sam(encoder, config)
            torch._dynamo.reset()
            rows.append(dict(model=name, config=config, **profile(encoder, x, args.iters, args.mode, args.top)))
            text = markdown(meta, rows)
            (args.out / "profile_encoder.md").write_text(text)
            (args.out / "profile_encoder.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            del encoder
            torch.cuda.empty_cache()
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
