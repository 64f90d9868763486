"""Kernel benchmark on a GPU: sam-sparse against SDPA, FlexAttention and flash_4, all in one run.

Shapes: SAM's global layer (N = 4096 tokens on a 64 x 64 grid, rel-pos on) for vit_b (12 heads, D=64)
and vit_h (16 heads, D=80) at batch 1 and 8, block densities 1.0 / 0.5 / 0.25 / 0.1; and SAM's window
layer, both as SAM partitions it (25 * B windows of 196 tokens, 14 x 14 rel-pos) and read in place from
the unpadded 64 x 64 grid by window_attn (what patch_sam runs).
Effective TFLOP/s count 4 * B * H * D * (active query-key pairs). GPU times come from CUDA-graph replays
(host launch cost is measured on its own, behind a queued GPU sleep, as cpu_us).

    python scripts/bench_kernel.py --out results.md [--commit SHA] [--no-flex]

segment-anything-fast's flash_4 joins the baselines when `segment_anything_fast.flash_4` imports (it is
not on PyPI and not shipped here: put its module on PYTHONPATH); its own autotuning takes minutes.
"""

import argparse
import datetime
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from sam_sparse.kernels import BlockLayout, block_sparse_attn, triton_attn, window_attn

MODELS = {"vit_b": (12, 64), "vit_h": (16, 80)}


def bench(fn):
    """Median GPU time of fn in ms, from CUDA-graph replays so that host launch cost is left out
    (it is reported separately as cpu_us); plain events where a graph cannot be captured."""
    fn()
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:
        torch.cuda.synchronize()
        return do_bench(fn, warmup=25, rep=100, return_mode="median")


def balanced_mask(B, H, nb, density, device, gen):
    """Each query block keeps its own block plus random others: exactly round(density * nb) per row."""
    keep = max(1, round(density * nb))
    scores = torch.rand(B, H, nb, nb, device=device, generator=gen)
    scores.diagonal(dim1=-2, dim2=-1).fill_(2.0)
    idx = scores.topk(keep, dim=-1).indices
    return torch.zeros(B, H, nb, nb, dtype=torch.bool, device=device).scatter_(-1, idx, True)


def materialized_bias(rel_h, rel_w):
    """SAM's N x N bias, as the eager model builds it: (B, H, N, kh*kw)."""
    B, H, N, kh = rel_h.shape
    kw = rel_w.shape[-1]
    return (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, H, N, kh * kw).contiguous()


def sdpa(q, k, v, bias, backend):
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias)


def cpu_us_per_call(fn, n=50):
    """Host time to issue one call, measured behind a long GPU sleep so the GPU never waits for the host."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the calls
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return dt * 1e6


def try_time(fn):
    try:
        fn()
        torch.cuda.synchronize()
        return bench(fn)
    except Exception as e:  # a backend that refuses a shape: report, don't stop
        return f"n/a ({type(e).__name__})"


def flex_runner(q, k, v, rel_h, rel_w, mask, bs, kw):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    B, N, H, D = q.shape

    def score_mod(score, b, h, qi, kj):
        return score + rel_h[b, h, qi, kj // kw] + rel_w[b, h, qi, kj % kw]

    bm = None
    if mask is not None:
        def mask_mod(b, h, qi, kj):
            return mask[b, h, qi // bs, kj // bs]
        bm = create_block_mask(mask_mod, B, H, N, N, device=q.device, BLOCK_SIZE=bs)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: flex(qt, kt, vt, score_mod=score_mod, block_mask=bm)


def flash4_runner(q, k, v, rel_h, rel_w):
    """segment-anything-fast's fused kernel, when its module is importable (not shipped with us)."""
    from segment_anything_fast.flash_4 import _attention_rel_h_rel_w

    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    # its layout: rel_h (B, H, N, kh, 1) and rel_w (B, H, N, 1, kw), contiguous
    rh, rw = rel_h.contiguous().unsqueeze(-1), rel_w.contiguous().unsqueeze(-2)
    return lambda: _attention_rel_h_rel_w(qt, kt, vt, rh, rw)


def tuned_config(q, k, v, layout, rel_h, rel_w, window=None) -> str:
    """The launch config tuning picked for this call: BLOCK_M x BLOCK_N, warps, stages, rel_w @ I, TMA."""
    lists = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    c = triton_attn.make_plan(q, k, v, *lists, rel_h, rel_w, None, q.shape[-1] ** -0.5, 128, window=window).config
    return (f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{' relw@I' if c.get('W_DOT') else ''}"
            f"{' tma' if c.get('TMA') else ''}")


def fmt(x):
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_kernel.md")
    ap.add_argument("--commit", default=os.environ.get("SAM_SPARSE_COMMIT", "unknown"))
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--flex-batches", default="1", type=lambda x: [int(b) for b in x.split(",")])
    ap.add_argument("--models", default="vit_b,vit_h")
    ap.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for model in args.models.split(","):
        H, D = MODELS[model]
        for B in (int(b) for b in args.batches.split(",")):
            N, kh, kw, bs = 4096, 64, 64, 128
            qkv = torch.randn(B, N, 3, H, D, device=dev, dtype=dt, generator=gen)
            q, k, v = qkv.unbind(2)  # strided views, as SAM's qkv projection gives them
            # (B, H, k, N) storage viewed as (B, H, N, k): the layout the patcher produces
            rel_h = torch.randn(B, H, kh, N, device=dev, dtype=dt, generator=gen).transpose(-1, -2)
            rel_w = torch.randn(B, H, kw, N, device=dev, dtype=dt, generator=gen).transpose(-1, -2)
            base = {}
            bias = materialized_bias(rel_h, rel_w)
            base["SDPA cuDNN + bias"] = try_time(lambda: sdpa(q, k, v, bias, SDPBackend.CUDNN_ATTENTION))
            base["SDPA mem-eff + bias"] = try_time(lambda: sdpa(q, k, v, bias, SDPBackend.EFFICIENT_ATTENTION))
            del bias
            torch.cuda.empty_cache()
            base["SDPA flash, no bias"] = try_time(lambda: sdpa(q, k, v, None, SDPBackend.FLASH_ATTENTION))
            base["SDPA cuDNN, no bias"] = try_time(lambda: sdpa(q, k, v, None, SDPBackend.CUDNN_ATTENTION))
            try:
                f4 = flash4_runner(q, k, v, rel_h, rel_w)
                base["flash_4 (sam-fast)"] = try_time(f4)
                # a baseline must compute the same thing: its output against ours, relative L2
                try:
                    ref = block_sparse_attn(q, k, v, rel_h=rel_h, rel_w=rel_w).float()
                    base["flash_4 rel diff"] = ((f4().transpose(1, 2).float() - ref).norm() / ref.norm()).item()
                except Exception as e:
                    base["flash_4 rel diff"] = f"n/a ({type(e).__name__})"
            except ImportError:
                base["flash_4 (sam-fast)"] = "not importable"
            dense_ms = None
            for density in (float(d) for d in args.densities.split(",")):
                block_mask = None if density == 1.0 else balanced_mask(B, H, N // bs, density, dev, gen)
                actual = 1.0 if block_mask is None else block_mask.float().mean().item()
                # the layout, built once, as patch_sam does; block_sparse_attn also takes the bool mask
                mask = None if block_mask is None else BlockLayout.from_mask(block_mask, bs)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn = lambda: block_sparse_attn(q, k, v, mask, rel_h=rel_h, rel_w=rel_w)  # noqa: E731
                ours = bench(fn)
                extra = torch.cuda.max_memory_allocated() - before
                picked = tuned_config(q, k, v, mask, rel_h, rel_w)
                dense_ms = ours if mask is None else dense_ms
                lists_ms = None
                if mask is not None:
                    lists_ms = bench(lambda: BlockLayout.from_mask(block_mask, bs))
                nobias = bench(lambda: block_sparse_attn(q, k, v, mask)) if mask is None else None
                # rel-pos terms stored row-major (B, H, N, k) instead of (B, H, k, N): the layout check.
                rh_rm, rw_rm = rel_h.contiguous(), rel_w.contiguous()
                rowmajor = bench(lambda: block_sparse_attn(q, k, v, mask, rel_h=rh_rm, rel_w=rw_rm))
                # The same mask with keys in 8 x 16 tiles (token_order: tiles): another bias path.
                tiles = bench(lambda: block_sparse_attn(q, k, v, mask, rel_h=rel_h, rel_w=rel_w, key_tile=(8, 16)))
                cpu_us = cpu_us_per_call(fn)
                flex = "skipped"
                if not args.no_flex and B in args.flex_batches:
                    try:
                        flex = try_time(flex_runner(q, k, v, rel_h, rel_w, block_mask, bs, kw))
                    except Exception as e:
                        flex = f"n/a ({type(e).__name__})"
                flops = 4 * B * H * D * N * N * actual
                row = dict(
                    shape=f"{model} global B={B}", density=round(actual, 3), ours_ms=ours, ours_nobias_ms=nobias,
                    ours_rowmajor_ms=rowmajor, ours_tiles_ms=tiles, cpu_us=cpu_us, config=picked,
                    tflops=flops / ours / 1e9, vs_dense=(ours / dense_ms) if dense_ms else None,
                    target_vs_dense=actual + 0.1, lists_ms=lists_ms, flex_relpos_ms=flex,
                    extra_mem_mb=extra / 2**20, nxn_mb=B * H * N * N * 2 / 2**20, **base,
                )
                rows.append(row)
                print(json.dumps(row, default=str), flush=True)
            # SAM's window layer: 25 windows of 14 x 14 per image
            Bw, Nw = 25 * B, 196
            qkv = torch.randn(Bw, Nw, 3, H, D, device=dev, dtype=dt, generator=gen)
            q, k, v = qkv.unbind(2)
            rel_h = torch.randn(Bw, H, Nw, 14, device=dev, dtype=dt, generator=gen)
            rel_w = torch.randn(Bw, H, Nw, 14, device=dev, dtype=dt, generator=gen)
            bias = materialized_bias(rel_h, rel_w)
            fn = lambda: block_sparse_attn(q, k, v, rel_h=rel_h, rel_w=rel_w)  # noqa: E731
            ours = bench(fn)
            row = dict(
                shape=f"{model} window B={B} ({Bw}x196)", density=1.0, ours_ms=ours, cpu_us=cpu_us_per_call(fn),
                config=tuned_config(q, k, v, None, rel_h, rel_w),
                tflops=4 * Bw * H * D * Nw * Nw / ours / 1e9,
                **{"SDPA cuDNN + bias": try_time(lambda: sdpa(q, k, v, bias, SDPBackend.CUDNN_ATTENTION)),
                   "SDPA mem-eff + bias": try_time(lambda: sdpa(q, k, v, bias, SDPBackend.EFFICIENT_ATTENTION)),
                   "SDPA flash, no bias": try_time(lambda: sdpa(q, k, v, None, SDPBackend.FLASH_ATTENTION)),
                   "SDPA cuDNN, no bias": try_time(lambda: sdpa(q, k, v, None, SDPBackend.CUDNN_ATTENTION))},
            )
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            # The same window layer read in place from the unpadded 64 x 64 grid (window_attn, as patch_sam
            # runs it): 64 x 64 real queries instead of 70 x 70, padding keys = the qkv bias.
            grid = torch.randn(B, 64, 64, 3, H, D, device=dev, dtype=dt, generator=gen)
            pad = torch.randn(3, H, D, device=dev, dtype=dt, generator=gen)
            gq, gk, gv = grid.unbind(3)
            g_rel_h = torch.randn(B, H, 14, 4096, device=dev, dtype=dt, generator=gen).transpose(-1, -2)
            g_rel_w = torch.randn(B, H, 14, 4096, device=dev, dtype=dt, generator=gen).transpose(-1, -2)
            fn = lambda: window_attn(gq, gk, gv, (14, 14), k_pad=pad[1], v_pad=pad[2], rel_h=g_rel_h,  # noqa: E731
                                     rel_w=g_rel_w)
            ours = bench(fn)
            row = dict(shape=f"{model} window in place B={B} (64x64 grid)", density=1.0, ours_ms=ours,
                       config=tuned_config(gq, gk, gv, None, g_rel_h, g_rel_w, window=(14, 14)),
                       cpu_us=cpu_us_per_call(fn), tflops=4 * B * H * D * 4096 * Nw / ours / 1e9)  # real queries only
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    cols = ["shape", "density", "ours_ms", "config", "ours_nobias_ms", "ours_rowmajor_ms", "ours_tiles_ms", "cpu_us", "tflops", "vs_dense", "target_vs_dense", "SDPA cuDNN + bias",
            "SDPA mem-eff + bias", "SDPA flash, no bias", "SDPA cuDNN, no bias", "flash_4 (sam-fast)", "flash_4 rel diff",
            "flex_relpos_ms", "lists_ms", "extra_mem_mb", "nxn_mb"]
    head = (f"Card: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
            f"dtype {args.dtype}; commit {args.commit}; date {datetime.date.today()}; host {platform.node()}")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(dict(header=head, rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    main()
