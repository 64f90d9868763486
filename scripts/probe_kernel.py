"""Where the time goes: every launch config of the kernel on one shape, with and without the bias,
and the host cost of each layer of the launch path. A tuning aid (device only, not CI).

    python scripts/probe_kernel.py [--batch 8] [--heads 12] [--dim 64] [--density 1.0] [--tiles]
"""

import argparse
import itertools
import time

import torch
from triton.testing import do_bench, do_bench_cudagraph

from sam_sparse.kernels import block_lists, block_sparse_attn, triton_attn


def host_us(fn, n=100):
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(400_000_000)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--density", type=float, default=1.0)
    ap.add_argument("--tiles", action="store_true")
    args = ap.parse_args()
    B, H, D, N = args.batch, args.heads, args.dim, 4096
    dt = torch.bfloat16
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dt)
    q, k, v = qkv.unbind(2)
    # (B, H, k, N) storage viewed as (B, H, N, k), as the patcher lays the rel-pos terms out
    rh = torch.randn(B, H, 64, N, device="cuda", dtype=dt).transpose(-1, -2)
    rw = torch.randn(B, H, 64, N, device="cuda", dtype=dt).transpose(-1, -2)
    tile = (8, 16) if args.tiles else None
    mask = None if args.density >= 1 else torch.rand(B, H, 32, 32, device="cuda") < args.density
    lists = block_lists(mask) if mask is not None else (None, None)
    flops = 4 * B * H * D * N * N * (1.0 if mask is None else mask.float().mean().item())
    rows = []
    shapes = ((128, 64, 8), (128, 128, 8), (64, 64, 4), (64, 128, 4), (128, 64, 4))
    for (bm, bn, warps), stages, w_dot in itertools.product(shapes, (2, 3), (0, 1)):
        if w_dot and (bn != 64 or args.tiles):
            continue  # rel_w @ I applies only where a key tile is one grid row
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "W_DOT": w_dot, "num_warps": warps, "num_stages": stages}
        res = {}
        for name, bias in (("bias", True), ("nobias", False)):
            if w_dot and not bias:
                continue  # the same kernel as W_DOT=0
            fn = lambda: triton_attn.attention_triton(  # noqa: E731
                q, k, v, *lists, rh if bias else None, rw if bias else None, tile if bias else None,
                D**-0.5, 128, config=cfg)
            try:
                res[name] = do_bench_cudagraph(fn, rep=50)
            except Exception as e:
                res[name] = f"{type(e).__name__}"
        rows.append((cfg, res))
        print(cfg, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()},
              {k: round(flops / v / 1e9) for k, v in res.items() if isinstance(v, float)}, flush=True)
    best = min((r for r in rows if isinstance(r[1].get("bias"), float)), key=lambda r: r[1]["bias"])
    bestnb = min((r for r in rows if isinstance(r[1].get("nobias"), float)), key=lambda r: r[1]["nobias"])
    print("best with bias:", best)
    print("best without bias:", bestnb)
    # host cost of each layer of the launch path
    cfg = best[0]
    api = lambda: block_sparse_attn(q, k, v, mask, rel_h=rh, rel_w=rw, key_tile=tile)  # noqa: E731
    api()
    print("tuned config for the API call:", triton_attn.make_plan(q, k, v, *lists, rh, rw, tile, D**-0.5, 128).config)
    launcher_fixed = lambda: triton_attn.attention_triton(q, k, v, *lists, rh, rw, tile, D**-0.5, 128, config=cfg)  # noqa: E731
    launcher_tuned = lambda: triton_attn.attention_triton(q, k, v, *lists, rh, rw, tile, D**-0.5, 128)  # noqa: E731
    for name, fn in (("public API", api), ("launcher, autotuned", launcher_tuned), ("launcher, fixed config", launcher_fixed)):
        print(f"host us per call, {name}: {host_us(fn):.1f}; GPU ms (events) {do_bench(fn, rep=50):.4f}; GPU ms (graph) {do_bench_cudagraph(fn, rep=50):.4f}")


if __name__ == "__main__":
    main()
