"""Kernel benchmark on a GPU: sam-sparse against SDPA, FlexAttention and flash_4, all in one run.

Shapes: SAM's global layer (N = 4096 tokens on a 64 x 64 grid, rel-pos on) for vit_b (12 heads, D=64)
and vit_h (16 heads, D=80) at batch 1 and 8, block densities 1.0 / 0.5 / 0.25 / 0.1; and SAM's window
layer, both as SAM partitions it (25 * B windows of 196 tokens, 14 x 14 rel-pos) and read in place from
the unpadded 64 x 64 grid by window_attn (what patch_sam runs).
Effective TFLOP/s count 4 * B * H * D * (active query-key pairs). GPU times come from CUDA-graph replays
(host launch cost is measured on its own, behind a queued GPU sleep, as cpu_us).

    python scripts/bench_kernel.py --out results.md [--commit SHA] [--no-flex] [--section all|sam|memory|hiera]

The memory section (`--section memory`, about a minute on an H200, tuning included) is SAM 2's video memory
attention (issue 23): 4096 queries (a 64 x 64 frame) x 28,736 keys (7 memory frames of 4096 tokens + 64
pointer tokens), head dim 256, one head, at 1 and 16 objects: ours dense against SDPA flash / cuDNN /
efficient, ours with a spatial band mask (each query block keeps the key blocks of its own rows +- a radius
in every frame, and the pointer tokens) at about density 0.25, the varlen batch of 16 objects whose
memories hold 1..7 frames (against the same objects padded to the longest), and memory self-attention
(4096 x 4096). Rows "values late" time the cross-attention as patch_sam runs it: the kernel over the 64-wide
memory features, v_proj after it, against SAM 2's order (v_proj on every key, then SDPA over 256-wide values).
`--section memory --dry-run` runs on a CPU: it builds the masks and writes their rows.

The hiera section (`--section hiera`) is SAM 2's Hiera encoder layers at batch 8 (issue 22): global 4096
tokens and windows of 14, 8, 4 and 7, head dim 56 (hiera_b+) and 64 (`--hiera-dims`, e.g. 72 for hiera_l), ours
read in place against SDPA on the partitioned windows as sam2 runs it, and ours at a few fixed launch configs.
Where triton_attn.OVERLAP_SECOND_CHUNK changes how a head dim is cut (72: columns 0-63 and 56-71 instead of
one chunk of 128), a row also times ours tuned with it on and off and gives the error of one against the other.

The configs section (`--section configs`) times ours at fixed launch configs where the tuner's candidate list
was cut or a target is missed: hiera_l's 16 x 16 windows and its q-pooled block (64 x 64 against 128-key tiles),
and the memory cross-attention at 16 objects beside SDPA cuDNN and flash.

segment-anything-fast's flash_4 joins the baselines when `segment_anything_fast.flash_4` imports (it is
not on PyPI and not shipped here: put its module on PYTHONPATH); its own autotuning takes minutes.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from sam_sparse.files import atomic_path
from sam_sparse.kernels import BlockLayout, block_sparse_attn, block_sparse_attn_varlen, triton_attn, window_attn

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
    plan = tuned_plan(q, k, v, layout, rel_h, rel_w, window)
    c, split = plan.config, getattr(plan, "split", None)
    return (f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{' relw@I' if c.get('W_DOT') else ''}"
            f"{' tma' if c.get('TMA') else ''}{f' split-K {split.n_split}' if split else ''}")


def tuned_plan(q, k, v, layout, rel_h, rel_w, window=None):
    lists = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    return triton_attn.make_plan(q, k, v, *lists, rel_h, rel_w, None, q.shape[-1] ** -0.5, 128, window=window)


def unsplit_ms(q, k, v, layout):
    """The tuned config without its split over the keys (None when the tuner split nothing)."""
    plan = tuned_plan(q, k, v, layout, None, None)
    if getattr(plan, "split", None) is None:
        return None
    lists = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    cfg = {**plan.config, "SPLIT_K": 1}
    return bench(lambda: triton_attn.attention_triton(q, k, v, *lists, None, None, None, q.shape[-1] ** -0.5, 128,
                                                      config=cfg))


def fmt(x):
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def sam_rows(args, dt, dev, gen) -> list:
    """SAM's global and window layers (the shapes in the module docstring), one row per measurement."""
    from torch.nn.attention import SDPBackend

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
    return rows


# SAM 2's video memory attention (issue 23): the current frame's 64 x 64 tokens attend to the memory of up to
# 7 frames of 4096 tokens plus 64 pointer tokens (16 object pointers x 4), head dim 256, one head.
FRAME_TOKENS, MEMORY_FRAMES, POINTER_TOKENS, MEMORY_HEAD_DIM, MEMORY_BLOCK = 4096, 7, 64, 256, 128
MEMORY_TARGETS = {"dense_vs_best_sdpa": 1.15, "band_vs_dense": 0.35}
MEMORY_KV_DIM = 64  # the memory features' width (SAM 2.1's kv_in_dim), before v_proj


def memory_band_mask(frames: int, pointer_tokens: int, radius: int, frame_tokens: int = FRAME_TOKENS,
                     block: int = MEMORY_BLOCK) -> torch.Tensor:
    """bool (1, 1, QB, KB) over frame_tokens queries (the current frame) and frames * frame_tokens +
    pointer_tokens keys (SAM 2's memory order: frames, then pointer tokens), built from block rows and
    columns: query block i keeps, in each memory frame, the key blocks j of that frame with |j - i| <= radius
    (a 128-token block is 2 rows of the 64 x 64 grid, so these are the rows near the query's own, full
    width), and every block holding pointer tokens. frame_tokens must be a multiple of block."""
    if frame_tokens % block:
        raise ValueError(f"frame_tokens={frame_tokens} must be a multiple of block={block}")
    fb = frame_tokens // block
    kb = -(-(frames * frame_tokens + pointer_tokens) // block)
    i = torch.arange(fb)[:, None]
    j = torch.arange(kb)[None, :]
    in_frames = j < frames * fb
    return ((in_frames & ((j % fb - i).abs() <= radius)) | ~in_frames)[None, None]


def kept_pairs(mask: torch.Tensor, seqlen_k: int, block: int = MEMORY_BLOCK) -> int:
    """Query-key pairs a (1, 1, QB, KB) block mask keeps over FRAME_TOKENS queries and seqlen_k keys (the last
    key block may be partial): the work the kernel does, for TFLOP/s and densities."""
    sizes = (seqlen_k - torch.arange(mask.shape[-1]) * block).clamp(0, block)
    return int((mask[0, 0].long() * sizes).sum()) * block


def band_radius(density: float, frames: int, pointer_tokens: int) -> int:
    """The band radius (in blocks) whose mask keeps the fraction of query-key pairs nearest to `density`."""
    nk, fb = frames * FRAME_TOKENS + pointer_tokens, FRAME_TOKENS // MEMORY_BLOCK
    kept = [kept_pairs(memory_band_mask(frames, pointer_tokens, r), nk) / (FRAME_TOKENS * nk) for r in range(fb)]
    return min(range(fb), key=lambda r: abs(kept[r] - density))


def varlen_frames(objects: int) -> list:
    """Memory frames per object for the varlen case: spread evenly over 1..7 (objects prompted on
    different frames)."""
    return [1 + round((MEMORY_FRAMES - 1) * i / max(1, objects - 1)) for i in range(objects)]


def varlen_pointers(frames: int) -> int:
    """Pointer tokens of an object with `frames` memory frames: 4 per object pointer, one pointer per frame
    seen (at least the memory frames), at most 16 pointers."""
    return 4 * min(16, 2 * frames)


def memory_rows(args, dt, dev, gen) -> list:
    """The memory section: cross-attention at B objects (dense vs SDPA flash / cuDNN / efficient, a spatial
    band at ~args.memory_density), the varlen batch of objects with memories of 1..7 frames, and memory
    self-attention (4096 x 4096). One row per measurement; ratios against the issue's targets."""
    from torch.nn.attention import SDPBackend

    D, H, nq = MEMORY_HEAD_DIM, 1, FRAME_TOKENS
    nk = MEMORY_FRAMES * FRAME_TOKENS + POINTER_TOKENS
    radius = band_radius(args.memory_density, MEMORY_FRAMES, POINTER_TOKENS)
    band = memory_band_mask(MEMORY_FRAMES, POINTER_TOKENS, radius)
    density = kept_pairs(band, nk) / (nq * nk)  # of the query-key pairs (the block density is a little higher)
    rows = []

    def emit(row):
        row = dict(section="memory", **row)
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)

    shape = f"cross {nq}x{nk} D={D} H=1"
    for B in args.memory_batches:
        flops = 4 * B * H * D * nq * nk
        if args.dry_run:
            emit(dict(shape=shape, B=B, variant="band", density=round(density, 3), radius=radius,
                      mask_blocks=tuple(band.shape)))
            continue
        q = torch.randn(B, nq, H, D, device=dev, dtype=dt, generator=gen)
        k = torch.randn(B, nk, H, D, device=dev, dtype=dt, generator=gen)
        v = torch.randn(B, nk, H, D, device=dev, dtype=dt, generator=gen)
        base = {name: try_time(lambda b=backend: sdpa(q, k, v, None, b)) for name, backend in (
            ("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
            ("SDPA efficient", SDPBackend.EFFICIENT_ATTENTION))}
        timed = [t for t in (base["SDPA flash"], base["SDPA cuDNN"]) if isinstance(t, float)]
        best = min(timed) if timed else None
        dense = bench(lambda: block_sparse_attn(q, k, v))
        ref = sdpa(q, k, v, None, SDPBackend.EFFICIENT_ATTENTION).transpose(1, 2).float()
        diff = ((block_sparse_attn(q, k, v).float() - ref).norm() / ref.norm()).item()
        emit(dict(shape=shape, B=B, variant="dense", density=1.0, ours_ms=dense, tflops=flops / dense / 1e9,
                  config=tuned_config(q, k, v, None, None, None), unsplit_ms=unsplit_ms(q, k, v, None),
                  rel_diff_vs_sdpa=diff, **base,
                  dense_vs_best_sdpa=dense / best if best else None,
                  target_dense_vs_best_sdpa=MEMORY_TARGETS["dense_vs_best_sdpa"]))
        layout = BlockLayout.from_mask(band.to(dev), MEMORY_BLOCK)
        sparse = bench(lambda: block_sparse_attn(q, k, v, layout))
        emit(dict(shape=shape, B=B, variant=f"band r={radius}", density=round(density, 3), ours_ms=sparse,
                  tflops=flops * density / sparse / 1e9, config=tuned_config(q, k, v, layout, None, None),
                  unsplit_ms=unsplit_ms(q, k, v, layout),
                  band_vs_dense=sparse / dense, target_band_vs_dense=MEMORY_TARGETS["band_vs_dense"]))
        del v, ref
        for row in late_value_rows(q, k, layout, round(density, 3), base, dt, dev, gen):
            emit(dict(shape=shape, B=B, **row))
        del q, k
        torch.cuda.empty_cache()

    # Varlen: objects prompted on different frames, each memory its own length, one launch.
    frames = varlen_frames(args.varlen_objects)
    lengths = [f * FRAME_TOKENS + varlen_pointers(f) for f in frames]
    masks = [memory_band_mask(f, varlen_pointers(f), radius) for f in frames]
    kb = max(m.shape[-1] for m in masks)
    kept = sum(kept_pairs(m, n) for m, n in zip(masks, lengths))
    vmask = torch.zeros(len(frames), 1, nq // MEMORY_BLOCK, kb, dtype=torch.bool)
    for o, m in enumerate(masks):
        vmask[o, :, :, :m.shape[-1]] = m[0]
    pairs = sum(lengths) * nq  # query-key pairs computed densely
    vshape = f"varlen {len(frames)} objects, {nq} x [{min(lengths)}..{max(lengths)}] D={D} H=1"
    if args.dry_run:
        emit(dict(shape=vshape, B=len(frames), variant="varlen band", lengths=lengths, density=round(kept / pairs, 3),
                  mask_blocks=tuple(vmask.shape)))
    else:
        cu_q = torch.arange(0, (len(frames) + 1) * nq, nq, device=dev, dtype=torch.int32)
        cu_k = torch.tensor([0, *itertools.accumulate(lengths)], device=dev, dtype=torch.int32)
        q = torch.randn(len(frames) * nq, H, D, device=dev, dtype=dt, generator=gen)
        k = torch.randn(sum(lengths), H, D, device=dev, dtype=dt, generator=gen)
        v = torch.randn(sum(lengths), H, D, device=dev, dtype=dt, generator=gen)
        vlayout = BlockLayout.from_mask(vmask.to(dev), MEMORY_BLOCK)
        run = lambda m: block_sparse_attn_varlen(q, k, v, cu_q, cu_k, nq, max(lengths), m)  # noqa: E731
        varlen_dense = bench(lambda: run(None))
        varlen_band = bench(lambda: run(vlayout))
        # The alternative to varlen: every object padded to the longest memory, as one batch.
        qp = q.view(len(frames), nq, H, D)
        kp = torch.randn(len(frames), max(lengths), H, D, device=dev, dtype=dt, generator=gen)
        padded = bench(lambda: block_sparse_attn(qp, kp, kp))
        padded_cudnn = try_time(lambda: sdpa(qp, kp, kp, None, SDPBackend.CUDNN_ATTENTION))
        flops = 4 * H * D * pairs
        emit(dict(shape=vshape, B=len(frames), variant="varlen dense", density=1.0, ours_ms=varlen_dense,
                  tflops=flops / varlen_dense / 1e9, lengths=lengths, padded_dense_ms=padded,
                  padded_cudnn_ms=padded_cudnn, varlen_vs_padded=varlen_dense / padded))
        emit(dict(shape=vshape, B=len(frames), variant=f"varlen band r={radius}", density=round(kept / pairs, 3),
                  ours_ms=varlen_band, tflops=flops * kept / pairs / varlen_band / 1e9,
                  band_vs_dense=varlen_band / varlen_dense))
        del q, k, v, kp
        torch.cuda.empty_cache()
        rows.append(rotary_row(frames, lengths, dt, dev, gen))
        print(json.dumps(rows[-1], default=str), flush=True)

    # Memory self-attention: the frame's tokens among themselves.
    for B in args.memory_batches:
        sshape = f"self {nq}x{nq} D={D} H=1"
        if args.dry_run:
            emit(dict(shape=sshape, B=B, variant="dense"))
            continue
        q, k, v = torch.randn(B, nq, 3, H, D, device=dev, dtype=dt, generator=gen).unbind(2)
        base = {name: try_time(lambda b=backend: sdpa(q, k, v, None, b)) for name, backend in (
            ("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION))}
        timed = [t for t in base.values() if isinstance(t, float)]
        ours = bench(lambda: block_sparse_attn(q, k, v))
        emit(dict(shape=sshape, B=B, variant="dense", density=1.0, ours_ms=ours,
                  tflops=4 * B * H * D * nq * nq / ours / 1e9, config=tuned_config(q, k, v, None, None, None), **base,
                  dense_vs_best_sdpa=ours / min(timed) if timed else None))
    return rows


def late_value_rows(q, k, layout, band_density: float, sdpa_ms: dict, dt, dev, gen) -> list:
    """SAM 2's memory cross-attention with its value projection, both orders: SAM 2's, v = v_proj(memory) (the
    64-wide memory features to 256) then SDPA; sam-sparse's (patches/sam2_memory.py), the kernel over the memory
    itself (V of 64 columns) then v_proj on the queries. q, k (B, Nq | Nk, 1, 256) as the memory rows'. The
    ratios set ours (kernel + v_proj) against SDPA alone (without its v_proj) as well as with it."""
    from torch.nn.attention import SDPBackend

    B, nk = k.shape[:2]
    mem = torch.randn(B, nk, 1, MEMORY_KV_DIM, device=dev, dtype=dt, generator=gen)
    proj = torch.nn.Linear(MEMORY_KV_DIM, q.shape[-1], device=dev, dtype=dt)
    theirs = {name: try_time(lambda b=backend: sdpa(q, k, proj(mem), None, b)) for name, backend in (
        ("SDPA flash", SDPBackend.FLASH_ATTENTION), ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION))}
    alone = [t for t in (sdpa_ms["SDPA flash"], sdpa_ms["SDPA cuDNN"]) if isinstance(t, float)]
    with_proj = [t for t in theirs.values() if isinstance(t, float)]
    v32 = F.linear(mem.float(), proj.weight.float(), proj.bias.float())
    ref = sdpa(q.float(), k.float(), v32, None, SDPBackend.EFFICIENT_ATTENTION).transpose(1, 2)
    rows = []
    for variant, lay in (("dense, values late", None), ("band, values late", layout)):
        ours = bench(lambda m=lay: proj(block_sparse_attn(q, k, mem, m)))
        kernel = bench(lambda m=lay: block_sparse_attn(q, k, mem, m))
        row = dict(variant=variant, density=1.0 if lay is None else band_density, ours_ms=ours, kernel_ms=kernel,
                   config=tuned_config(q, k, mem, lay, None, None),
                   **{f"{name} + v_proj": t for name, t in theirs.items()})
        if lay is None:
            dense = ours
            diff = ((proj(block_sparse_attn(q, k, mem)).float() - ref).norm() / ref.norm()).item()
            row.update(rel_diff_vs_sdpa=diff, ours_vs_best_sdpa_alone=ours / min(alone) if alone else None,
                       ours_vs_best_sdpa_with_v_proj=ours / min(with_proj) if with_proj else None,
                       target_dense_vs_best_sdpa=MEMORY_TARGETS["dense_vs_best_sdpa"])
        else:
            row.update(band_vs_dense=ours / dense, target_band_vs_dense=MEMORY_TARGETS["band_vs_dense"])
        rows.append(row)
    return rows


def rotary_row(frames, lengths, dt, dev, gen) -> dict:
    """The rotary encoding of one memory cross-attention call over the packed objects: q (objects, 1, 4096,
    256) and the packed keys, pointer tokens left out. SAM 2's apply_rotary_enc (complex float32) on q and on
    the frame tokens gathered and scattered back (what the patch ran before run 54) vs kernels.rotary_embedding_
    (one pass each, in place)."""
    from sam2.modeling.position_encoding import apply_rotary_enc, compute_axial_cis

    from sam_sparse.kernels import rotary_embedding_

    nq, D = FRAME_TOKENS, MEMORY_HEAD_DIM
    side = math.isqrt(nq)
    freqs = compute_axial_cis(dim=D, end_x=side, end_y=side, theta=10000.0).to(dev)
    cos, sin = freqs.real.contiguous(), freqs.imag.contiguous()
    q = torch.randn(len(frames), 1, nq, D, device=dev, dtype=dt, generator=gen)
    k = torch.randn(1, 1, sum(lengths), D, device=dev, dtype=dt, generator=gen)
    starts = [0, *itertools.accumulate(lengths)]
    idx = torch.cat([torch.arange(s, s + f * nq) for s, f in zip(starts, frames)]).to(dev)
    rope_rows = torch.full((sum(lengths),), -1, dtype=torch.int32)
    for s, f in zip(starts, frames):
        rope_rows[s:s + f * nq] = torch.arange(f * nq, dtype=torch.int32) % nq
    rope_rows = rope_rows.to(dev)

    def sam2_way():
        qq, kk = q.clone(), k.clone()
        qq, kk[:, :, idx] = apply_rotary_enc(qq, kk[:, :, idx], freqs_cis=freqs, repeat_freqs_k=True)

    def ours():
        qq, kk = q.clone(), k.clone()
        rotary_embedding_(qq, cos, sin)
        rotary_embedding_(kk, cos, sin, rope_rows)

    copies = bench(lambda: (q.clone(), k.clone()))  # both variants clone first: subtracted
    theirs_ms, ours_ms = bench(sam2_way) - copies, bench(ours) - copies
    return dict(section="memory", shape=f"rotary q {len(frames)}x{nq} + packed k {sum(lengths)}, D={D}",
                B=len(frames), variant="rotary", ours_ms=ours_ms, sam2_rope_ms=theirs_ms,
                rope_speedup=theirs_ms / ours_ms)


MEMORY_COLS = ["shape", "B", "variant", "density", "ours_ms", "tflops", "config", "unsplit_ms", "SDPA flash", "SDPA cuDNN",
               "SDPA efficient", "dense_vs_best_sdpa", "target_dense_vs_best_sdpa", "band_vs_dense",
               "target_band_vs_dense", "padded_dense_ms", "padded_cudnn_ms", "varlen_vs_padded", "rel_diff_vs_sdpa",
               "radius", "lengths", "mask_blocks", "sam2_rope_ms", "rope_speedup", "kernel_ms", "SDPA flash + v_proj",
               "SDPA cuDNN + v_proj", "ours_vs_best_sdpa_alone", "ours_vs_best_sdpa_with_v_proj"]
SAM_COLS = ["shape", "density", "ours_ms", "config", "ours_nobias_ms", "ours_rowmajor_ms", "ours_tiles_ms", "cpu_us",
            "tflops", "vs_dense", "target_vs_dense", "SDPA cuDNN + bias", "SDPA mem-eff + bias", "SDPA flash, no bias",
            "SDPA cuDNN, no bias", "flash_4 (sam-fast)", "flash_4 rel diff", "flex_relpos_ms", "lists_ms",
            "extra_mem_mb", "nxn_mb"]


# Hiera's attention shapes at 1024 px, batch 8 (issue 22): (name, grid side, heads, window; 0 = global).
HIERA_CASES = [("global", 64, 8, 0), ("window 14", 64, 8, 14), ("window 8", 256, 2, 8), ("window 4", 128, 4, 4),
               ("window 7", 32, 16, 7)]
# Fixed launch configs timed beside the tuned one: how far the tuner's pick is from the others.
HIERA_CONFIGS = [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                 dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                 dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2), dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
                 dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)]


def overlap_columns(d: int, ours) -> dict:
    """Ours tuned with triton_attn.OVERLAP_SECOND_CHUNK on and off, where the flag changes how head dim d is cut:
    both times and the relative error of the overlapping chunk's output against the plain one (ours(None): a
    tuned call that bypasses the plan cache). The flag keeps its value."""
    default = triton_attn.OVERLAP_SECOND_CHUNK

    def run(on: bool):
        triton_attn.OVERLAP_SECOND_CHUNK = on
        return ours(None)

    try:
        triton_attn.OVERLAP_SECOND_CHUNK = True
        chunks = triton_attn.head_dim_chunks(d)
        triton_attn.OVERLAP_SECOND_CHUNK = False
        if chunks == triton_attn.head_dim_chunks(d):
            return {}
        cols = {"overlap chunks": "{} + {} from {}".format(*chunks),
                "overlap_ms": try_time(lambda: run(True)), "plain_ms": try_time(lambda: run(False))}
        try:
            ref = run(True).float()
            cols["overlap_err"] = f"{((ref - run(False).float()).norm() / ref.norm()).item():.2e}"
        except Exception as e:
            cols["overlap_err"] = f"n/a ({type(e).__name__})"
        return cols
    finally:
        triton_attn.OVERLAP_SECOND_CHUNK = default


def hiera_rows(args, dt, dev, gen) -> list:
    """The hiera section: Hiera's layer shapes, q / k / v as strided views of one qkv projection (B, GH, GW, 3,
    heads, d) as sam2 makes them, at head dim 56 (hiera_b+) and 64 (a power of two, for comparison): ours tuned
    and at fixed configs (windows read in place), against SDPA cuDNN and flash on the partitioned windows
    (B * windows, heads, tokens, d) as sam2 runs them (windows padded with zero tokens, as Hiera pads)."""
    from torch.nn.attention import SDPBackend

    rows = []
    B = args.hiera_batch
    for name, side, heads, win in HIERA_CASES:
        if args.hiera_shapes and name.replace(" ", "") not in args.hiera_shapes:
            continue
        for d in args.hiera_dims:
            qkv = torch.randn(B, side, side, 3, heads, d, device=dev, dtype=dt, generator=gen)
            q, k, v = qkv.unbind(3)  # (B, side, side, heads, d) strided views
            if win:
                p = -side % win
                padded = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, p, 0, p))
                n = (side + p) // win
                parts = padded.view(B, n, win, n, win, 3, heads, d).permute(0, 1, 3, 2, 4, 5, 6, 7)
                parts = parts.reshape(B * n * n, win * win, 3, heads, d)
                ours = lambda cfg=None: triton_attn.attention_triton(  # noqa: E731
                    q, k, v, None, None, None, None, None, d ** -0.5, 128, window=(win, win),
                    k_pad=pad_kv, v_pad=pad_kv, config=cfg)
                pad_kv = torch.zeros(heads, d, device=dev, dtype=dt)
                tuned = lambda: window_attn(q, k, v, (win, win), k_pad=pad_kv, v_pad=pad_kv)  # noqa: E731
                tokens = B * n * n * win * win
            else:
                parts = qkv.view(B, side * side, 3, heads, d)
                q2, k2, v2 = parts.unbind(2)
                ours = lambda cfg=None: triton_attn.attention_triton(  # noqa: E731
                    q2, k2, v2, None, None, None, None, None, d ** -0.5, 128, config=cfg)
                tuned = lambda: block_sparse_attn(q2, k2, v2)  # noqa: E731
                tokens = B * side * side
            pq, pk, pv = parts.unbind(2)
            row = dict(section="hiera", shape=f"{name}, {side}x{side}, {heads} heads", d=d, B=B,
                       ours_ms=try_time(tuned),
                       config=tuned_config(q, k, v, None, None, None, window=(win, win)) if win else
                       tuned_config(q2, k2, v2, None, None, None))
            for backend, col in ((SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN"), (SDPBackend.FLASH_ATTENTION, "SDPA flash")):
                row[col] = try_time(lambda b=backend: sdpa(pq, pk, pv, None, b))
            for cfg in HIERA_CONFIGS:
                key = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
                row[key] = try_time(lambda c=cfg: ours(c))
            row.update(overlap_columns(d, ours))
            base = min((x for x in (row["SDPA cuDNN"], row["SDPA flash"]) if isinstance(x, float)), default=None)
            if base and isinstance(row["ours_ms"], float):
                row["ours / best SDPA"] = round(row["ours_ms"] / base, 2)
            row["tokens"] = tokens
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    return rows


HIERA_COLS = ["shape", "d", "B", "ours_ms", "config", "SDPA cuDNN", "SDPA flash", "ours / best SDPA", "overlap chunks",
              "overlap_ms", "plain_ms", "overlap_err"] + [
    f"{c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}" for c in HIERA_CONFIGS]


CONFIG_CASES = {
    # hiera_l's stage-3 windows (16 x 16 on a 64 x 64 grid, 8 heads) and the q-pooled block into stage 4 (q 8 x 8
    # windows on a 32 x 32 grid, 16 heads), head dim 72, batch 8: 64 x 64 tiles against 128-key ones, and tiles
    # of 128 and 256 query rows (a whole 16 x 16 window per program: its K / V read once, not four times).
    "window 16": [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=s) for s in (2, 3)] + [
        dict(BLOCK_M=64, BLOCK_N=128, num_warps=w, num_stages=3) for w in (8, 4)] + [
        # K / V through TMA: a 64-key tile is 4 whole rows of a 16 x 16 window, one (4, 16) box of the key grid
        dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=s, TMA=1) for s in (2, 3)] + [
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=w, num_stages=3, TMA=1) for w in (4, 8)],
    # hiera_l's 8 x 8 windows: stage 1 (256 x 256 grid, 2 heads) and stage 4 (32 x 32, 16 heads), head dim 72,
    # batch 8: one 64-key tile per window, pointer loads against one (8, 8) TMA box.
    "window 8": [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=t) for t in (0, 1)],
    # hiera_l's global blocks (4096 tokens, 8 heads, head dim 72, batch 8): the tuner's 128 x 64 TMA tile against
    # 256-row tiles over four warp groups.
    "global 72": [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=1),
                  dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=2, TMA=1),
                  dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=3, TMA=1),
                  dict(BLOCK_M=256, BLOCK_N=128, num_warps=16, num_stages=2, TMA=1)],
    # hiera_b+'s stage-3 windows (14 x 14 on a 64 x 64 grid, 8 heads, head dim 56, batch 8): 196 tokens, so a
    # 64-row tile leaves 4 rows and the last 64-key step 4 keys; register caps (maxnreg) for more CTAs per SM.
    "window 14": [dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=s, **cap) for s in (2, 3)
                  for cap in ({}, {"maxnreg": 96})] + [
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)],
    # hiera_b+'s global blocks (4096 tokens, 8 heads, head dim 56 read as one 64-wide TMA box, batch 8); run 115 timed
    # register caps of 112 and 128, 128 x 128 tiles and 64 x 64 ones too: all slower.
    "global 56": [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=s, TMA=1) for s in (3, 4)] + [
        dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)],
    # Memory cross-attention at 16 objects, head dim 256: the tuner's 128-row tiles and what else fits, among
    # them 256-row tiles over four warp groups (each K / V tile serves twice the rows; Q takes 128 KB of shared
    # memory, so only short key tiles fit beside it).
    "memory 16": [dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, TMA=1),
                  dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3, TMA=1),
                  dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=4, TMA=1),
                  dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
                  dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=1),
                  dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, TMA=1, maxnreg=240),
                  dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=1, TMA=1),
                  dict(BLOCK_M=256, BLOCK_N=32, num_warps=16, num_stages=2, TMA=1),
                  dict(BLOCK_M=256, BLOCK_N=32, num_warps=16, num_stages=3, TMA=1),
                  dict(BLOCK_M=256, BLOCK_N=64, num_warps=16, num_stages=1, TMA=1),
                  dict(BLOCK_M=256, BLOCK_N=32, num_warps=16, num_stages=2)],
}


def config_block(cfg: dict) -> int:
    """A block size (the mask's; no mask here) that the config's tiles divide."""
    return max(128, cfg["BLOCK_M"], cfg["BLOCK_N"])


def config_rows(args, dt, dev, gen) -> list:
    """The configs section: ours at fixed launch configs (CONFIG_CASES) where the tuner's candidate list was cut
    or a target is missed; SDPA cuDNN and flash beside each shape (on partitioned windows, as sam2 runs them).
    One row per (shape, config)."""
    rows = []

    def emit(shape, config, ms):
        rows.append(dict(section="configs", shape=shape, config=config, ms=ms))
        print(json.dumps(rows[-1], default=str), flush=True)

    groups = {"window": _window_configs, "packed": _packed_configs, "global": _global_configs, "memory": _memory_configs,
              "bplus": _bplus_configs}
    for name in args.config_cases:
        groups[name](dt, dev, gen, emit)
    return rows


def _sdpa_rows(shape, q, k, v, emit) -> None:
    from torch.nn.attention import SDPBackend

    for backend, name in ((SDPBackend.CUDNN_ATTENTION, "SDPA cuDNN"), (SDPBackend.FLASH_ATTENTION, "SDPA flash")):
        emit(shape, name, try_time(lambda b=backend: sdpa(q, k, v, None, b)))


def _windows(t: torch.Tensor, win: int) -> torch.Tensor:
    """(B, G, G, H, D) -> (B * windows, win * win, H, D): the grid cut into windows, as sam2 partitions it."""
    B, G, _, H, D = t.shape
    n = G // win
    return t.view(B, n, win, n, win, H, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(B * n * n, win * win, H, D)


def _window_configs(dt, dev, gen, emit) -> None:
    B, d = 8, 72
    q, k, v = torch.randn(B, 64, 64, 3, 8, d, device=dev, dtype=dt, generator=gen).unbind(3)
    pad = torch.zeros(8, d, device=dev, dtype=dt)
    q4, k4, v4 = torch.randn(B, 64, 64, 3, 16, d, device=dev, dtype=dt, generator=gen).unbind(3)
    qp = F.max_pool2d(q4.flatten(3).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).reshape(B, 32, 32, 16, d)
    pad4 = torch.zeros(16, d, device=dev, dtype=dt)
    win_shape = "window 16 on 64x64, 8 heads, d 72, B 8"
    pool_shape = "q-pooled: q 8x8 windows on 32x32, keys 16x16 on 64x64, 16 heads, d 72, B 8"
    _sdpa_rows(win_shape, _windows(q, 16), _windows(k, 16), _windows(v, 16), emit)
    _sdpa_rows(pool_shape, _windows(qp, 8), _windows(k4, 16), _windows(v4, 16), emit)
    for side, heads in ((256, 2), (32, 16)):
        q8, k8, v8 = torch.randn(B, side, side, 3, heads, d, device=dev, dtype=dt, generator=gen).unbind(3)
        pad8 = torch.zeros(heads, d, device=dev, dtype=dt)
        shape8 = f"window 8 on {side}x{side}, {heads} heads, d 72, B 8"
        _sdpa_rows(shape8, _windows(q8, 8), _windows(k8, 8), _windows(v8, 8), emit)
        for cfg in CONFIG_CASES["window 8"]:
            emit(shape8, cfg, try_time(lambda c=cfg: triton_attn.attention_triton(
                q8, k8, v8, None, None, None, None, None, d ** -0.5, 128, window=(8, 8), k_pad=pad8, v_pad=pad8,
                config=c)))
    for cfg in CONFIG_CASES["window 16"]:
        bs = config_block(cfg)
        emit(win_shape, cfg, try_time(lambda c=cfg: triton_attn.attention_triton(
            q, k, v, None, None, None, None, None, d ** -0.5, bs, window=(16, 16), k_pad=pad, v_pad=pad, config=c)))
        emit(pool_shape, cfg, try_time(
            lambda c=cfg: triton_attn.attention_triton(qp, k4, v4, None, None, None, None, None, d ** -0.5, bs,
                                                       window=(16, 16), q_window=(8, 8), k_pad=pad4, v_pad=pad4,
                                                       config=c)))


# hiera_l's windows of at most 64 tokens (head dim 72, batch 8): (name, key grid side, heads, key window, query
# window or None), then (PACK, BLOCK_M, BLOCK_N, warps, TMA) configs: one window per program against several side
# by side (triton_attn's packed windows).
PACKED_CASES = [
    ("stage 1: windows 8 on 256x256, 2 heads", 256, 2, 8, None,
     [(1, 64, 64, 4, 0), (2, 128, 64, 8, 0), (2, 128, 128, 8, 0)]),
    ("stage 2 pooled: q 4x4 on 128x128, keys 8x8 on 256x256, 4 heads", 256, 4, 8, 4,
     [(1, 16, 64, 4, 0), (4, 64, 64, 4, 0), (4, 64, 64, 4, 1), (8, 128, 64, 8, 0), (8, 128, 64, 8, 1)]),
    ("stage 2: windows 4 on 128x128, 4 heads", 128, 4, 4, None,
     [(1, 16, 16, 4, 0), (4, 64, 64, 4, 0), (8, 128, 64, 8, 0), (8, 128, 128, 8, 0), (2, 32, 32, 4, 0)]),
    ("stage 3 pooled: q 2x2 on 64x64, keys 4x4 on 128x128, 8 heads", 128, 8, 4, 2,
     [(1, 16, 16, 4, 0), (16, 64, 64, 4, 0), (32, 128, 64, 8, 0), (8, 32, 32, 4, 0)]),
    ("stage 4: windows 8 on 32x32, 16 heads", 32, 16, 8, None, [(1, 64, 64, 4, 0), (2, 128, 64, 8, 0), (2, 128, 128, 8, 0)]),
    ("stage 4 pooled: q 8x8 on 32x32, keys 16x16 on 64x64, 16 heads", 64, 16, 16, 8,
     [(1, 64, 64, 4, 1), (2, 128, 64, 8, 1), (2, 128, 64, 8, 0)]),
]


def _packed_configs(dt, dev, gen, emit) -> None:
    B, d = 8, 72
    for name, side, heads, win, q_win, cfgs in PACKED_CASES:
        q, k, v = torch.randn(B, side, side, 3, heads, d, device=dev, dtype=dt, generator=gen).unbind(3)
        if q_win is not None:
            q = q.unflatten(1, (side // 2, 2)).unflatten(3, (side // 2, 2)).amax(dim=(2, 4))
        pad = torch.zeros(heads, d, device=dev, dtype=dt)
        qw = None if q_win is None else (q_win, q_win)
        nq = (q_win or win) ** 2
        _sdpa_rows(name, _windows(q, q_win or win), _windows(k, win), _windows(v, win), emit)
        for packing in (False, True):
            triton_attn.PACK_WINDOWS = packing
            try:
                plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, d ** -0.5, 128, window=(win, win),
                                             q_window=qw)
            finally:
                triton_attn.PACK_WINDOWS = True
            call = lambda p=plan: p(q, k, v, None, None, None, None, None, None, pad, pad)  # noqa: E731
            emit(name, f"tuned, packing {'on' if packing else 'off'}: {plan.config}", try_time(call))
        for pack, bm, bn, warps, tma in cfgs:
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=3, PACK=pack, TMA=tma)
            if pack == 1 and bm > nq:
                continue
            emit(name, cfg, try_time(lambda c=cfg: triton_attn.attention_triton(
                q, k, v, None, None, None, None, None, d ** -0.5, config_block(c), window=(win, win), q_window=qw,
                k_pad=pad, v_pad=pad, config=c)))


def _global_configs(dt, dev, gen, emit) -> None:
    B, d = 8, 72
    q, k, v = torch.randn(B, 4096, 3, 8, d, device=dev, dtype=dt, generator=gen).unbind(2)
    shape = "global 4096 tokens, 8 heads, d 72, B 8"
    _sdpa_rows(shape, q, k, v, emit)
    for cfg in CONFIG_CASES["global 72"]:
        emit(shape, cfg, try_time(lambda c=cfg: triton_attn.attention_triton(
            q, k, v, None, None, None, None, None, d ** -0.5, config_block(c), config=c)))


def _plan_with(crop: bool, tail: bool, *args, **kwargs):
    """triton_attn.make_plan with CROP_WINDOWS and TAIL_KEYS set as given (their values back after). The flags are
    not in the tuning key: every variant of one shape runs the config tuned for the first."""
    before = triton_attn.CROP_WINDOWS, triton_attn.TAIL_KEYS
    triton_attn.CROP_WINDOWS, triton_attn.TAIL_KEYS = crop, tail
    try:
        return triton_attn.make_plan(*args, **kwargs)
    finally:
        triton_attn.CROP_WINDOWS, triton_attn.TAIL_KEYS = before


def _bplus_configs(dt, dev, gen, emit) -> None:
    """hiera_b+'s 14 x 14 windows and global blocks at batch 8 (head dim 56): the tuned plan, each launch of the
    windows' plan alone (the windows inside the grid, then those that overhang it), and CONFIG_CASES' configs."""
    B, d, heads = 8, 56, 8
    qkv = torch.randn(B, 64, 64, 3, heads, d, device=dev, dtype=dt, generator=gen)
    q, k, v = qkv.unbind(3)
    pad = torch.zeros(heads, d, device=dev, dtype=dt)
    shape = "window 14 on 64x64, 8 heads, d 56, B 8"
    parts = _windows(F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, 6, 0, 6)).flatten(3, 4), 14).unflatten(2, (3, heads))
    _sdpa_rows(shape, *parts.unbind(2), emit)
    args = (q, k, v, None, None, None, None, None, None, pad, pad)
    out = torch.empty_like(q)
    # The windows that overhang the grid cropped to it (triton_attn.CROP_WINDOWS) or padded; the last partial key step
    # as a narrow tile after the loop (TAIL_KEYS) or as a masked full step.
    variants = (("cropped, tail", True, True), ("cropped", True, False), ("padded", False, False))
    for tag, crop, tail in variants:
        plan = _plan_with(crop, tail, q, k, v, None, None, None, None, None, d ** -0.5, 128, window=(14, 14))
        emit(shape, f"tuned, {tag}: {plan.config}", try_time(lambda p=plan: p(*args)))
        for i, p in enumerate(getattr(plan, "plans", [plan])):
            emit(shape, f"tuned, {tag}, launch {i} alone", try_time(lambda p=p: p(*args, out=out)))
    # the q-pooled block into stage 4: q 7 x 7 windows on 32 x 32 (pooled), keys 14 x 14 on 64 x 64, 16 heads
    q4, k4, v4 = torch.randn(B, 64, 64, 3, 16, d, device=dev, dtype=dt, generator=gen).unbind(3)
    q4 = q4.unflatten(1, (32, 2)).unflatten(3, (32, 2)).amax(dim=(2, 4))
    pad4 = torch.zeros(16, d, device=dev, dtype=dt)
    for tag, crop, tail in variants:
        plan = _plan_with(crop, tail, q4, k4, v4, None, None, None, None, None, d ** -0.5, 128, window=(14, 14),
                          q_window=(7, 7))
        emit("pooled: q 7x7 on 32x32, keys 14x14 on 64x64, 16 heads, d 56, B 8", f"tuned, {tag}: {plan.config}",
             try_time(lambda p=plan: p(q4, k4, v4, None, None, None, None, None, None, pad4, pad4)))
    for cfg in CONFIG_CASES["window 14"]:
        emit(shape, cfg, try_time(lambda c=cfg: triton_attn.attention_triton(
            q, k, v, None, None, None, None, None, d ** -0.5, 128, window=(14, 14), k_pad=pad, v_pad=pad, config=c)))
    q2, k2, v2 = qkv.view(B, 4096, 3, heads, d).unbind(2)
    shape = "global 4096 tokens, 8 heads, d 56, B 8"
    _sdpa_rows(shape, q2, k2, v2, emit)
    emit(shape, "tuned", try_time(lambda: block_sparse_attn(q2, k2, v2)))
    for cfg in CONFIG_CASES["global 56"]:
        emit(shape, cfg, try_time(lambda c=cfg: triton_attn.attention_triton(
            q2, k2, v2, None, None, None, None, None, d ** -0.5, config_block(c), config=c)))


def _memory_configs(dt, dev, gen, emit) -> None:
    D, nq, nk = MEMORY_HEAD_DIM, FRAME_TOKENS, MEMORY_FRAMES * FRAME_TOKENS + POINTER_TOKENS
    shape = f"memory cross {nq}x{nk}, d {D}, 16 objects"
    q, k, v = (torch.randn(16, n, 1, D, device=dev, dtype=dt, generator=gen) for n in (nq, nk, nk))
    _sdpa_rows(shape, q, k, v, emit)
    for cfg in CONFIG_CASES["memory 16"]:
        emit(shape, cfg, try_time(lambda c=cfg: triton_attn.attention_triton(
            q, k, v, None, None, None, None, None, D ** -0.5, config_block(c), config=c)))


CONFIG_COLS = ["shape", "config", "ms"]


def table(rows: list, cols: list) -> list:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]


def parse_args(argv=None):
    ints = lambda x: [int(b) for b in x.split(",")]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_kernel.md", help="markdown table; the JSON rows go beside it (.json)")
    ap.add_argument("--commit", default=os.environ.get("SAM_SPARSE_COMMIT", "unknown"))
    ap.add_argument("--section", choices=("all", "sam", "memory", "hiera", "configs"), default="all",
                    help="sam: SAM's global and window layers; memory: SAM 2's video memory attention; hiera: "
                         "SAM 2's Hiera encoder layers")
    ap.add_argument("--hiera-batch", default=8, type=int, help="images per batch in the hiera section")
    ap.add_argument("--hiera-dims", default=[56, 64], type=ints,
                    help="the hiera section's head dims (default 56,64; hiera_l's is 72)")
    ap.add_argument("--hiera-shapes", default=None, type=lambda s: s.split(","),
                    help="the hiera section's shapes to run, e.g. global,window14 (default: all five)")
    ap.add_argument("--config-cases", default=["window", "global", "memory"], type=lambda s: s.split(","),
                    help="the configs section's groups: window, packed, global, memory, bplus (default window,global,memory)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--flex-batches", default="1", type=ints)
    ap.add_argument("--models", default="vit_b,vit_h")
    ap.add_argument("--densities", default="1.0,0.5,0.25,0.1")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--memory-batches", default="1,16", type=ints, help="objects per batch in the memory section")
    ap.add_argument("--memory-density", default=0.25, type=float, help="target block density of the band mask")
    ap.add_argument("--varlen-objects", default=16, type=int)
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: build the memory section's masks and write their rows (densities, radius, lengths)")
    args = ap.parse_args(argv)
    if args.dry_run and args.section != "memory":
        ap.error("--dry-run covers the memory section only: add --section memory")
    if not 0 < args.memory_density <= 1:
        ap.error(f"--memory-density={args.memory_density}: expected a number in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)  # before any GPU work
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = "cpu" if args.dry_run else "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    sections = {"sam": sam_rows, "memory": memory_rows, "hiera": hiera_rows, "configs": config_rows}
    rows = {name: fn(args, dt, dev, gen) for name, fn in sections.items() if args.section in ("all", name)}
    card = "dry run (no GPU)" if args.dry_run else torch.cuda.get_device_name()
    head = (f"Card: {card}; torch {torch.__version__}, triton {triton.__version__}; "
            f"dtype {args.dtype}; commit {args.commit}; date {datetime.date.today()}; host {platform.node()}")
    lines = [head]
    if "sam" in rows:
        lines += ["", "SAM's attention layers", ""] + table(rows["sam"], SAM_COLS)
    if "memory" in rows:
        lines += ["", "SAM 2's video memory attention (targets: dense <= 1.15x min(flash, cuDNN); band at density "
                  "~0.25 <= 0.35x dense)", ""] + table(rows["memory"], MEMORY_COLS)
    if "hiera" in rows:
        lines += ["", "SAM 2's Hiera layers (ms; fixed-config columns: ours at that launch config)", ""] + table(
            rows["hiera"], HIERA_COLS)
    if "configs" in rows:
        lines += ["", "Fixed launch configs (ms)", ""] + table(rows["configs"], CONFIG_COLS)
    text = "\n".join(lines)
    print(text)
    with atomic_path(args.out) as tmp:
        tmp.write_text(text + "\n")
    with atomic_path(os.path.splitext(args.out)[0] + ".json") as tmp:
        tmp.write_text(json.dumps(dict(header=head, rows=[r for rs in rows.values() for r in rs]), indent=1, default=str))

if __name__ == "__main__":
    main()
