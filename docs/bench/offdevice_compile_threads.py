"""Off the device (a 2-core CPU machine, Triton 3.8, an sm90 target, no GPU): how far Triton's compiles of _attn_fwd overlap
on threads: the warmups make_plan(ahead=True) issues for hiera_b+-like shapes at batch 8 (nothing tuned yet), compiled one
after another (argument seq), then on a pool of N threads (argument N). 2026-12-04 on 2 cores: 22 jobs, seq 8.68 s,
2 threads 4.74 s (1.83x). Triton 3.6.0 (the device image's; torch 2.14.1 with triton==3.6.0 installed over it), the same
machine, 2026-12-04, twice each: seq 7.44 / 7.33 s, 2 threads 4.37 / 4.43 s (1.68x): about 19% of a compile holds the
GIL there (Amdahl), so 16 threads would bound it near 4x. Run: TRITON_INTERPRET=0 CUDA_VISIBLE_DEVICES= python
docs/bench/offdevice_compile_threads.py seq"""
import os, sys, time, tempfile
import torch
from concurrent.futures import ThreadPoolExecutor
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from sam_sparse.kernels import triton_attn as ta

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
fn = ta._attn_fwd
bind = create_function_from_signature(fn.signature, fn.params, backend)
jobs = {}
def run(*args, grid, warmup, **kw):
    kw.update(debug=kw.get("debug", fn.debug) or knobs.runtime.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, opts = bind(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    jobs[str(spec) + str(opts)] = (signature, constexprs, attrs, options)
fn.run = run
def qkv(shape, dtype=torch.bfloat16):
    return torch.empty(torch.Size(shape).numel(), dtype=dtype).view(shape).unbind(-3)
B = 8
# hiera_b+ at 1024 px: stage (grid, window, heads, head dim 56*?): dims 112/224/448/896 -> heads 2/4/8/16, hd 56
for (g, w, h) in ((256, 8, 2), (128, 4, 4), (64, 14, 8), (32, 7, 16)):
    q, k, v = qkv((B, g, g, 3, h, 56))
    pad = torch.zeros(3, h, 56, dtype=torch.bfloat16)
    ta.make_plan(q, k, v, None, None, None, None, None, 56 ** -0.5, 128, window=(w, w), ahead=True)
for (g, w, h) in ((256, 8, 4), (128, 4, 8), (64, 14, 16)):  # pooled into the next stage: q on the half grid
    q, k, v = qkv((B, g, g, 3, h, 56))
    pq = q[:, ::2, ::2].contiguous()
    ta.make_plan(pq, k, v, None, None, None, None, None, 56 ** -0.5, 128, window=(w, w), q_window=(w // 2, w // 2), ahead=True)
q, k, v = qkv((B, 4096, 3, 8, 56))
ta.make_plan(q, k, v, None, None, None, None, None, 56 ** -0.5, 128, ahead=True)
print("jobs", len(jobs), flush=True)
def compile_one(job):
    signature, constexprs, attrs, options = job
    from triton.compiler import ASTSource
    src = ASTSource(fn, signature, constexprs, attrs)
    import triton
    return triton.compile(src, target=target, options=options.__dict__)
mode = sys.argv[1]
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
t = time.time()
if mode == "seq":
    for j in jobs.values(): compile_one(j)
else:
    with ThreadPoolExecutor(int(mode)) as p: list(p.map(compile_one, jobs.values()))
print(mode, "s", round(time.time() - t, 2), flush=True)
