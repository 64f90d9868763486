"""Probe the kernel on head dims that are not one or two powers of two (SAM 2's 56 and 72), one case per
fresh process so that a fault in one cannot hide the others: global (block_sparse_attn) and windowed
(window_attn) layouts, tuned and with one fixed config, each checked against PyTorch's SDPA in float32.

    python scripts/probe_headdim.py [--cases=a,b] [--out=FILE]   # each case in its own subprocess
    python scripts/probe_headdim.py CASE [CONFIG]   # one case in this process (what the loop runs)
Writes one JSON line per case to stdout and, with --out, to FILE.
"""

import json
import os
import subprocess
import sys

import torch

CASES = {
    "global-72": dict(kind="global", d=72, heads=8, n=4096),
    "global-56": dict(kind="global", d=56, heads=8, n=4096),
    "global-80": dict(kind="global", d=80, heads=16, n=4096),
    "window-72": dict(kind="window", d=72, heads=2, grid=32, win=8),
    "window-56": dict(kind="window", d=56, heads=2, grid=32, win=8),
    "window-80": dict(kind="window", d=80, heads=16, grid=56, win=14),
    "window-96": dict(kind="window", d=96, heads=1, grid=32, win=8),
}


def run(name: str, fixed: bool) -> dict:
    from sam_sparse.kernels import block_sparse_attn, triton_attn, window_attn

    c = CASES[name]
    g = torch.Generator(device="cuda").manual_seed(0)
    if c["kind"] == "global":
        q, k, v = torch.randn(1, c["n"], 3, c["heads"], c["d"], device="cuda", generator=g).bfloat16().unbind(2)
        if fixed:
            out = triton_attn.attention_triton(q, k, v, None, None, None, None, None, c["d"] ** -0.5, 128,
                                               config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2))
        else:
            out = block_sparse_attn(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
        ref = ref.transpose(1, 2)
    else:
        G, w = c["grid"], c["win"]
        q, k, v = torch.randn(1, G, G, 3, c["heads"], c["d"], device="cuda", generator=g).bfloat16().unbind(3)
        if fixed:
            pads = torch.zeros(c["heads"], c["d"], device="cuda", dtype=torch.bfloat16)
            out = triton_attn.attention_triton(q, k, v, None, None, None, None, None, c["d"] ** -0.5, 128,
                                               window=(w, w), k_pad=pads, v_pad=pads,
                                               config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2))
        else:
            out = window_attn(q, k, v, (w, w))
        part = lambda t: t.view(1, G // w, w, G // w, w, *t.shape[3:]).transpose(2, 3).reshape(-1, w * w, *t.shape[3:])  # noqa: E731
        ref = torch.nn.functional.scaled_dot_product_attention(*(part(t).float().transpose(1, 2) for t in (q, k, v)))
        ref = ref.transpose(1, 2).reshape(1, G // w, G // w, w, w, *q.shape[3:]).transpose(2, 3).reshape(q.shape)
    torch.cuda.synchronize()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return dict(case=name, fixed=fixed, ok=err < 2e-2, rel_err=round(err, 5))


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out_file = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")), None)
    cases = next((a.split("=", 1)[1].split(",") for a in sys.argv[1:] if a.startswith("--cases=")), list(CASES))
    if args:
        print("PROBE " + json.dumps(run(args[0], len(args) > 1 and args[1] == "fixed")), flush=True)
        return 0
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for name in cases:
        for mode in ("fixed", "tuned"):
            res = subprocess.run([sys.executable, __file__, name, mode], env=env, capture_output=True, text=True,
                                 timeout=120)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBE ")]
            row = json.loads(line[-1][6:]) if line else dict(case=name, fixed=mode == "fixed", ok=False,
                                                             error=res.stderr.strip().splitlines()[-1:])
            print(json.dumps(row), flush=True)
            if out_file:
                with open(out_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
