"""SAM's global attention layer, launched a few times each way, for Nsight Compute to read the hardware
counters of: SDPA cuDNN without bias, and the kernel with and without the fused rel-pos bias at fixed
launch configs (no tuning runs, so only the kernels named here reach the profiler). Every variant is
checked against a float32 SDPA with the bias materialized before the profiled launches.

    ncu --clock-control none --kernel-name regex:'_attn_fwd|cudnn|fmha|flash' \\
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \\
        --section ComputeWorkloadAnalysis --section InstructionStats --csv --page details \\
        python scripts/ncu_attention.py --model vit_b --batch 8 > ncu.csv

Each variant runs --launches times; the first of each is its warm-up. --list prints the variants.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from sam_sparse.kernels import triton_attn

MODELS = {"vit_b": (12, 64), "vit_h": (16, 80)}
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


if __name__ == "__main__":
    main()
