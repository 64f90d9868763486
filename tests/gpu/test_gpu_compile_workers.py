"""Compile workers on the GPU: a fresh process (empty Triton cache, tuning on, 4 workers) tunes new shape
classes with its candidates compiled in worker processes (TMA configs among them on Hopper), then its outputs
are checked here against the float64 oracle, globally and per row.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_gpu_compile_workers.py
"""

import json
import os
import subprocess
import sys

import torch

from gpu_helpers import FLOOR, GPU_MARKS, ROW_FLOOR
from oracle import check_attention, check_window

pytestmark = GPU_MARKS

CHILD = """
import json, sys, torch
from sam_sparse.kernels import block_sparse_attn, compile_workers, window_attn
seed = int(sys.argv[1])
g = torch.Generator(device="cuda").manual_seed(seed)
rnd = lambda *s, dtype: torch.randn(*s, device="cuda", generator=g).to(dtype)
q, k, v = (rnd(1, 4096, 8, 72, dtype=torch.bfloat16) for _ in range(3))  # Hiera's global block (TMA on Hopper)
wq, wk, wv = (rnd(2, 40, 40, 4, 96, dtype=torch.float16) for _ in range(3))  # windows of 16, overhanging
with torch.inference_mode():
    out = block_sparse_attn(q, k, v)
    wout = window_attn(wq, wk, wv, (16, 16))
torch.cuda.synchronize()
torch.save(dict(q=q, k=k, v=v, out=out, wq=wq, wk=wk, wv=wv, wout=wout), sys.argv[2])
print("STATS", json.dumps(compile_workers.pool().stats))
"""


def test_kernels_compiled_by_workers_are_correct(tmp_path):
    seed = torch.seed() % 2**31
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), SAM_SPARSE_COMPILE_WORKERS="4",
               SAM_SPARSE_TUNE_CACHE="0", SAM_SPARSE_AUTOTUNE="1")
    env.pop("SAM_SPARSE_FORCE_TRITON", None)
    saved = tmp_path / "out.pt"
    res = subprocess.run([sys.executable, "-c", CHILD, str(seed), str(saved)], env=env, capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert res.returncode == 0, f"seed {seed}: {res.stderr[-3000:]}"
    stats = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("STATS ")][-1][6:])
    assert stats["failed"] == 0 and stats["workers"] >= 1, stats
    t = torch.load(saved, weights_only=True)
    check_attention(t["out"], t["q"], t["k"], t["v"], None, 128, seed, FLOOR, ROW_FLOOR)
    zero = t["wk"].new_zeros(4, 96)
    check_window(t["wout"], t["wq"], t["wk"], t["wv"], (16, 16), zero, zero, None, None, None, None, 128, seed, FLOOR,
                 ROW_FLOOR)
