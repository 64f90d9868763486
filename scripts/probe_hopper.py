"""Issue 14's probe: the kernel's launch configs on SAM's global and window layers, with the Hopper
path (TMA descriptors for K / V) on and off, rel_w through the tensor cores (W_DOT) or added, and register
caps (maxnreg), against SDPA in the same run.
(9324a69's version of this script, which made docs/benchmarks.md's run 24, also had a switch for
Triton's warp specialization, `tl.range(warp_specialize=True)`: it changed nothing for 8-warp configs
and the kernel no longer has it.)

Every variant is checked against a float32 SDPA with the rel-pos bias materialized (relative error
printed) before it is timed, so a fast wrong config shows up as wrong. One JSON line per measurement
goes to --out as it is measured (a run cut short keeps what it finished); a table is printed last.

    python scripts/probe_hopper.py --out $OUT/probe.jsonl [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import traceback

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from sam_sparse.kernels import triton_attn, window_attn
from sam_sparse.kernels.reference import attention_reference_window

MODELS = {"vit_b": (12, 64), "vit_h": (16, 80)}


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def global_case(B, H, D, dt, gen):
    N = 4096
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dt, generator=gen)
    q, k, v = qkv.unbind(2)
    rh = (torch.randn(B, H, 64, N, device="cuda", dtype=dt, generator=gen)).transpose(-1, -2)
    rw = (torch.randn(B, H, 64, N, device="cuda", dtype=dt, generator=gen)).transpose(-1, -2)
    return q, k, v, rh, rw


def sdpa_ref(q, k, v, rh, rw, scale):
    bias = (rh.float()[..., :, None] + rw.float()[..., None, :]).flatten(-2)  # (B, H, N, N)
    return F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                          v.transpose(1, 2).float(), attn_mask=bias, scale=scale).transpose(1, 2)


def global_layer(name, B, H, D, dt, gen, tiles, rec):
    """One global layer (N = 4096, rel-pos fused): SDPA without bias, each config, and the tuned plan."""
    q, k, v, rh, rw = global_case(B, H, D, dt, gen)
    scale = D**-0.5
    flops = 4 * B * H * 4096 * 4096 * D
    ref = sdpa_ref(q[:1], k[:1], v[:1], rh[:1], rw[:1], scale)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    base = {}
    for label, backend in (("cudnn", torch.nn.attention.SDPBackend.CUDNN_ATTENTION),
                           ("flash", torch.nn.attention.SDPBackend.FLASH_ATTENTION)):
        try:
            with torch.nn.attention.sdpa_kernel(backend):
                base[label] = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=scale))
        except Exception as e:  # noqa: BLE001
            base[label] = f"{type(e).__name__}"
    rec(dict(case="global", model=name, B=B, variant="sdpa no bias", **base))
    configs = [dict(BLOCK_M=bm, BLOCK_N=bn, W_DOT=wdot, num_warps=w, num_stages=st, TMA=tma, maxnreg=mr)
               for bm, bn, w, st, mr, wdot, tma_too in tiles for tma in ((0, 1) if tma_too else (0,))]
    for cfg in configs:
        for bias in (True, False) if not cfg["W_DOT"] else (True,):  # rel_w @ I only changes the biased kernel
            row = dict(case="global", model=name, B=B, bias=bias, **cfg)
            try:
                fn = lambda: triton_attn.attention_triton(  # noqa: E731
                    q, k, v, None, None, rh if bias else None, rw if bias else None, None, scale, 128, config=cfg)
                out = fn()
                if bias:
                    row["rel_err"] = round(rel_err(out[:1], ref), 5)
                ms = bench(fn)
                row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1),
                           vs_cudnn=round(ms / base["cudnn"], 3) if isinstance(base["cudnn"], float) else None)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            rec(row)
    # what the tuner picks from the shipped candidate list
    try:
        plan = triton_attn.make_plan(q, k, v, None, None, rh, rw, None, scale, 128)
        fn = lambda: plan(q, k, v, None, None, rh, rw, None, None)  # noqa: E731
        ms = bench(fn)
        rec(dict(case="global", model=name, B=B, variant="tuned", config=plan.config, ms=round(ms, 4),
                 tflops=round(flops / ms / 1e9, 1), vs_cudnn=round(ms / base["cudnn"], 3)))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rec(dict(case="global", model=name, B=B, variant="tuned", error=f"{type(e).__name__}: {str(e)[:300]}"))


def window_layer(name, B, H, D, dt, gen, rec):
    """One window layer (64 x 64 grid, 14 x 14 windows): window_attn in place vs the partitioned kernel."""
    scale = D**-0.5
    # window layers: SAM's partitioned layout through block_sparse_attn vs window_attn in place
    GH = GW = 64
    ws_ = 14
    qkv = torch.randn(B, GH, GW, 3, H, D, device="cuda", dtype=dt, generator=gen)
    bias_qkv = torch.randn(3, H, D, device="cuda", dtype=dt, generator=gen)
    qkv = qkv + bias_qkv
    q, k, v = qkv.unbind(3)
    rh = torch.randn(B, H, ws_, GH * GW, device="cuda", dtype=dt, generator=gen).transpose(-1, -2)
    rw = torch.randn(B, H, ws_, GH * GW, device="cuda", dtype=dt, generator=gen).transpose(-1, -2)
    try:
        new = lambda: window_attn(q, k, v, (ws_, ws_), k_pad=bias_qkv[1], v_pad=bias_qkv[2],  # noqa: E731
                                  rel_h=rh, rel_w=rw, softmax_scale=scale)
        out = new()
        ref = attention_reference_window(q[:1].float(), k[:1].float(), v[:1].float(), (ws_, ws_),
                                         bias_qkv[1].float(), bias_qkv[2].float(), None,
                                         rh[:1].float(), rw[:1].float(), scale)
        # the old way: pad + partition copies (as SAM's Block), rel terms gathered per window
        from sam_sparse.kernels import block_sparse_attn

        def part(t):  # (B, H, N, 14) -> (B*25, H, 196, 14), zero rows for padded queries
            g = t.reshape(B, H, GH, GW, ws_)
            g = torch.nn.functional.pad(g, (0, 0, 0, 6, 0, 6))
            return g.view(B, H, 5, 14, 5, 14, ws_).permute(0, 2, 4, 1, 3, 5, 6).reshape(B * 25, H, 196, ws_)

        # SAM's layout: the grid padded to 70 x 70 (padding = the bias) and cut into 25 windows of 196
        x = bias_qkv.expand(B, 70, 70, 3, H, D).clone()
        x[:, :GH, :GW] = qkv
        x = x.view(B, 5, 14, 5, 14, 3, H, D).transpose(2, 3).reshape(B * 25, 196, 3, H, D)
        qq, kk, vv = x.unbind(2)
        rh_w, rw_w = part(rh), part(rw)
        old = lambda: block_sparse_attn(qq, kk, vv, rel_h=rh_w, rel_w=rw_w, softmax_scale=scale)  # noqa: E731
        old()
        t_new, t_old = bench(new), bench(old)
        wflops = 4 * B * 25 * H * 196 * 196 * D
        rec(dict(case="window", model=name, B=B, rel_err=round(rel_err(out[:1], ref), 5),
                 ms_window_attn=round(t_new, 4), ms_partitioned_attention_only=round(t_old, 4),
                 tflops_window=round(wflops / t_new / 1e9, 1)))
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rec(dict(case="window", model=name, B=B, error=f"{type(e).__name__}: {str(e)[:300]}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "probe_hopper.jsonl"))
    ap.add_argument("--shapes", default="vit_b:1,vit_b:8,vit_h:1,vit_h:8")
    ap.add_argument("--quick", action="store_true", help="fewer configs")
    ap.add_argument("--cases", default="global,window", help="global, window or both")
    args = ap.parse_args()
    dt = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def rec(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    # (BLOCK_M, BLOCK_N, warps, stages, maxnreg, W_DOT, also through TMA)
    tiles = [(64, 64, 4, 2, 0, 0, 0), (64, 64, 4, 3, 0, 0, 1), (64, 64, 4, 2, 0, 1, 0), (64, 64, 4, 3, 0, 1, 1),
             (128, 64, 8, 2, 0, 0, 0), (128, 64, 8, 3, 0, 0, 1), (128, 64, 8, 2, 0, 1, 0), (128, 64, 8, 3, 0, 1, 0),
             (128, 64, 8, 3, 128, 0, 1), (64, 64, 4, 3, 128, 0, 1), (128, 128, 8, 3, 0, 0, 0)]
    if args.quick:
        tiles = tiles[:4]
    for shape in args.shapes.split(","):
        name, B = shape.split(":")
        B = int(B)
        H, D = MODELS[name]
        if "global" in args.cases:
            global_layer(name, B, H, D, dt, gen, tiles, rec)
        if "window" in args.cases:
            window_layer(name, B, H, D, dt, gen, rec)

    print("\n| case | model | B | config | bias | ms | TFLOP/s | vs cuDNN no bias | rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["case"] != "global" or "ms" not in r or "BLOCK_M" not in r:
            continue
        cfg = (f"{r['BLOCK_M']}x{r['BLOCK_N']} w{r['num_warps']} s{r['num_stages']} r{r['maxnreg']} tma{r['TMA']}"
               f" wdot{r['W_DOT']}")
        print(f"| global | {r['model']} | {r['B']} | {cfg} | {r['bias']} | {r['ms']} | {r['tflops']} | {r['vs_cudnn']} | {r.get('rel_err', '')} |")


if __name__ == "__main__":
    main()
