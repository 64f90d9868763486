"""Probe: would persistent programs speed up Hiera's window attention? (A measurement, not product code.)

hiera_l's 33 blocks of 16 x 16 windows run 4 key steps per 64-query program, and the kernel spends about 1.6x
the time per key step that it spends in a global block (runs 115-120): each program pays its prologue (Q load, the
first K / V loads) and epilogue for only 4 steps. A minimal window kernel (head dim 64, windows read in place from
sam2's (B, H, W, 3, heads, D) projection, no mask, no padding) runs here three ways on the same shape:
one work item (window, head, 64-query tile) per program; programs that loop over work items (a grid of
`--programs-per-sm` x SMs); and that loop with Triton's `flatten`, which fuses it with the key loop so the next
item's loads are pipelined behind the current item's steps. Beside them: triton_attn's tuned plan on the same
data, and SDPA cuDNN on sam2's partitioned windows. Every variant is checked against SDPA first.

    python scripts/probe_persistent_windows.py [--out probe.jsonl] [--batch 8] [--heads 8] [--window 16] [--grid 64]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

from sam_sparse.files import atomic_path
from sam_sparse.kernels import triton_attn


@triton.jit
def _windows_fwd(QKV, Out, qk_scale, s_b, s_y, s_x, s_h, o_b, o_y, o_x, o_h, n_items,
                 GRID: tl.constexpr, WIN: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLATTEN: tl.constexpr):
    """Window attention, WIN x WIN windows tiling a GRID x GRID token grid. QKV (B, GRID, GRID, 3, HEADS, D)
    contiguous (strides s_b, s_y, s_x, s_h in elements: q, k, v HEADS * D apart); Out (B, GRID, GRID, HEADS, D).
    Work items (image, window row, window column, head, query tile), the tile fastest; program p of P takes items
    p, p + P, ..."""
    NW: tl.constexpr = GRID // WIN
    QT: tl.constexpr = WIN * WIN // BLOCK_M
    STEPS: tl.constexpr = WIN * WIN // BLOCK_N
    offs_d = tl.arange(0, D)
    for item in tl.range(tl.program_id(0), n_items, tl.num_programs(0), flatten=FLATTEN):
        qt = item % QT
        r = item // QT
        h = r % HEADS
        r = r // HEADS
        wx = r % NW
        r = r // NW
        wy = r % NW
        img = r // NW
        offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
        q_rows = (wy * WIN + offs_m // WIN) * s_y + (wx * WIN + offs_m % WIN) * s_x
        base = QKV + img.to(tl.int64) * s_b + h * s_h
        q = tl.load(base + q_rows[:, None] + offs_d[None, :])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for step in range(STEPS):
            offs_n = step * BLOCK_N + tl.arange(0, BLOCK_N)
            k_rows = (wy * WIN + offs_n // WIN) * s_y + (wx * WIN + offs_n % WIN) * s_x
            k = tl.load(base + HEADS * D + k_rows[None, :] + offs_d[:, None])
            qk = tl.dot(q, k)
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(base + 2 * HEADS * D + k_rows[:, None] + offs_d[None, :])
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        o_rows = (wy * WIN + offs_m // WIN) * o_y + (wx * WIN + offs_m % WIN) * o_x
        tl.store(Out + img.to(tl.int64) * o_b + h * o_h + o_rows[:, None] + offs_d[None, :],
                 (acc / l_i[:, None]).to(Out.dtype.element_ty))


def run(qkv, out, win, programs, flatten, block_m=64, block_n=64, warps=4, stages=2):
    B, G, _, _, H, D = qkv.shape
    n_items = B * (G // win) ** 2 * H * (win * win // block_m)
    s = qkv.stride()
    o = out.stride()
    _windows_fwd[(min(programs or n_items, n_items),)](
        qkv, out, D ** -0.5 * 1.4426950408889634, s[0], s[1], s[2], s[4], o[0], o[1], o[2], o[3], n_items,
        GRID=G, WIN=win, HEADS=H, D=D, BLOCK_M=block_m, BLOCK_N=block_n, FLATTEN=flatten, num_warps=warps,
        num_stages=stages)
    return out


def partition(t, win):
    B, G, _, H, D = t.shape
    n = G // win
    return t.view(B, n, win, n, win, H, D).permute(0, 1, 3, 2, 4, 5, 6).reshape(B * n * n, win * win, H, D)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the JSON rows to this file (one per line, replaced whole)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--grid", type=int, default=64)
    args = ap.parse_args()
    dev, dt, D = "cuda", torch.bfloat16, 64
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(args.batch, args.grid, args.grid, 3, args.heads, D, device=dev, dtype=dt, generator=g)
    q, k, v = qkv.unbind(3)
    win = args.window
    parts = [partition(t, win).transpose(1, 2) for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = F.scaled_dot_product_attention(*parts)
    n = args.grid // win
    ref = ref.transpose(1, 2).reshape(args.batch, n, n, win, win, args.heads, D).permute(0, 1, 3, 2, 4, 5, 6)
    ref = ref.reshape(args.batch, args.grid, args.grid, args.heads, D)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.full_like(q, float("nan"))
    rows = []

    def emit(name, fn):
        out.fill_(float("nan"))
        try:
            res = fn()
            err = (res.float() - ref.float()).abs().max().item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
        except Exception as e:  # a variant that does not compile is a result too
            err, ms = None, f"{type(e).__name__}: {str(e)[:160]}"
        rows.append(dict(variant=name, ms=ms, max_err_vs_cudnn=err))
        print(json.dumps(rows[-1]), flush=True)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        emit("SDPA cuDNN on partitioned windows (partition copies not timed)",
             lambda: F.scaled_dot_product_attention(*parts).transpose(1, 2).reshape(-1, win, win, args.heads, D)
             .view(args.batch, n, n, win, win, args.heads, D).permute(0, 1, 3, 2, 4, 5, 6)
             .reshape(args.batch, args.grid, args.grid, args.heads, D))
    pad = torch.zeros(args.heads, D, device=dev, dtype=dt)
    plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, D ** -0.5, 128, window=(win, win))
    emit(f"triton_attn tuned {plan.config}", lambda: plan(q, k, v, None, None, None, None, None, None, pad, pad, out=out))
    for stages in (2, 3):
        emit(f"minimal, one item per program, stages {stages}", lambda s=stages: run(qkv, out, win, 0, False, stages=s))
        for per_sm in (2, 3, 4, 6, 8):
            for flatten in (False, True):
                emit(f"minimal, {per_sm} programs per SM looping, flatten {flatten}, stages {stages}",
                     lambda p=per_sm, f=flatten, s=stages: run(qkv, out, win, p * sms, f, stages=s))
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
