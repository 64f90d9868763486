"""SAM's global attention layer, launched a few times each way, for Nsight Compute to read the hardware
counters of: SDPA cuDNN without bias, and the kernel with and without the fused rel-pos bias at fixed
launch configs (no tuning runs, so only the kernels named here reach the profiler). Every variant is
checked against a float32 SDPA with the bias materialized before the profiled launches.

    ncu --clock-control none --kernel-name regex:'_attn_fwd|cudnn|fmha|flash' \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section ComputeWorkloadAnalysis --section InstructionStats --csv --page details \\
        python scripts/ncu_attention.py --model vit_b --batch 8 > ncu.csv

Each variant runs --launches times; the first of each is its warm-up. --list prints the variants.
`--model hiera_b+` profiles hiera_b+'s layers at head dim 56 instead (no rel-pos): SDPA cuDNN on the 14 x 14
windows partitioned as sam2 runs them (grid padded to 70 x 70) and on the global block, against the kernel's
windows read in place (two launches: the windows inside the grid, then those that overhang it) and its global
block, at the configs the tuner picked on an H200 (run 111), each checked against float32 SDPA.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from sam_sparse.kernels import triton_attn

MODELS = {"vit_b": (12, 64), "vit_h": (16, 80), "hiera_b+": (8, 56)}
# hiera_b+: name -> (launch config, window side or 0 for the global block)
HIERA_VARIANTS = {
    "window 14 64x64 w4 s2": (dict(BLOCK_M=64, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=2), 14),
    "global 128x64 w8 s3 tma": (dict(BLOCK_M=128, BLOCK_N=64, W_DOT=0, num_warps=8, num_stages=3, TMA=1), 0),
}
# name -> (launch config, with the rel-pos bias)
VARIANTS = {
    "bias 64x64 w4 s3": (dict(BLOCK_M=64, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=3), True),
    "bias 64x64 w4 s3 tma": (dict(BLOCK_M=64, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=3, TMA=1), True),
    "bias 64x64 w4 s3 tma maxnreg128": (dict(BLOCK_M=64, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=3, TMA=1,
                                             maxnreg=128), True),
    "bias+wdot 64x64 w4 s2": (dict(BLOCK_M=64, BLOCK_N=64, W_DOT=1, num_warps=4, num_stages=2), True),
    "nobias 64x64 w4 s3 tma": (dict(BLOCK_M=64, BLOCK_N=64, W_DOT=0, num_warps=4, num_stages=3, TMA=1), False),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="vit_b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--launches", type=int, default=2, help="launches per variant (the first is the warm-up)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        print(json.dumps({k: v[0] for k, v in VARIANTS.items()}, indent=1))
        return
    if args.model == "hiera_b+":
        return hiera(args)
    H, D = MODELS[args.model]
    B, N = args.batch, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).unbind(2)
    rh, rw = (torch.randn(B, H, 64, N, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(-1, -2)
              for _ in range(2))
    scale = D**-0.5
    bias = (rh[:1].float()[..., :, None] + rw[:1].float()[..., None, :]).flatten(-2)
    ref = F.scaled_dot_product_attention(*(t[:1].transpose(1, 2).float() for t in (q, k, v)), attn_mask=bias,
                                         scale=scale).transpose(1, 2)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        for _ in range(args.launches):
            F.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    for name, (cfg, with_bias) in VARIANTS.items():
        bias_args = (rh, rw) if with_bias else (None, None)
        plan = triton_attn.make_plan(q, k, v, None, None, *bias_args, None, scale, 128, config=cfg)
        for _ in range(args.launches):
            out = plan(q, k, v, None, None, *bias_args, None, None)
        torch.cuda.synchronize()
        if with_bias:
            err = ((out[:1].float() - ref).norm() / ref.norm()).item()
            print(f"{name}: relative error {err:.2e}", flush=True)
            assert err < 2e-2, f"{name}: relative error {err}"


def hiera(args) -> None:
    H, D = MODELS[args.model]
    B, G, W = args.batch, 64, 14
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, G, G, 3, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    pad = torch.zeros(H, D, device="cuda", dtype=torch.bfloat16)
    n = -(-G // W)
    # sam2's partition: zero-padded grid, (B * windows, heads, W * W, D) per q / k / v
    parts = F.pad(qkv, (0, 0, 0, 0, 0, 0, 0, n * W - G, 0, n * W - G)).view(B, n, W, n, W, 3, H, D)
    parts = parts.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, B * n * n, H, W * W, D)
    flat = qkv.view(B, G * G, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D) views
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        for _ in range(args.launches):
            F.scaled_dot_product_attention(*parts)
            F.scaled_dot_product_attention(*flat)
    q, k, v = qkv.unbind(3)
    for name, (cfg, win) in HIERA_VARIANTS.items():
        if win:
            plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, D ** -0.5, 128, window=(win, win),
                                         config=cfg)
            call = lambda: plan(q, k, v, None, None, None, None, None, None, pad, pad)  # noqa: E731
            ref = F.scaled_dot_product_attention(*(t[:n * n, :1].float() for t in parts))[:, 0]  # image 0, head 0
            ref = ref.view(n, n, W, W, D).transpose(1, 2).reshape(n * W, n * W, D)[:G, :G]
            got = lambda out: out[0, :, :, 0].float()  # noqa: E731
        else:
            q2, k2, v2 = (t.flatten(1, 2) for t in (q, k, v))
            plan = triton_attn.make_plan(q2, k2, v2, None, None, None, None, None, D ** -0.5, 128, config=cfg)
            call = lambda: plan(q2, k2, v2, None, None, None, None, None, None)  # noqa: E731
            ref = F.scaled_dot_product_attention(*(t[:1, :1].float() for t in flat))[0, 0]
            got = lambda out: out[0, :, 0].float()  # noqa: E731
        for _ in range(args.launches):
            out = call()
        torch.cuda.synchronize()
        err = ((got(out) - ref).norm() / ref.norm()).item()
        print(f"{name}: relative error {err:.2e}", flush=True)
        assert err < 2e-2, f"{name}: relative error {err}"


if __name__ == "__main__":
    main()
