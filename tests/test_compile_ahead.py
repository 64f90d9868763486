"""kernels.compile_ahead on CPU: when its block is on, and what a call inside it does (interface.py). The compiles
themselves need a GPU: tests/gpu/test_gpu_hiera.py checks that nothing compiles after the block."""

import pytest
import torch

from sam_sparse.kernels import block_sparse_attn, block_sparse_attn_varlen, compile_ahead, interface, window_attn


def _open():
    """The device of the compile_ahead block open on this thread, or None."""
    return getattr(interface._AHEAD, "device", None)


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton.runtime._async_compile", reason="this Triton has no async compiles")


def test_the_block_is_on_for_a_gpu_only(no_interpreter, monkeypatch):
    """On for CUDA where Triton compiles; off on the CPU, in Triton's interpreter, and inside a block already
    open on this thread; off again after the block, an exception included."""
    with compile_ahead("cpu") as on:
        assert on is False and _open() is None
    with compile_ahead(torch.device("cuda", 0)) as on:
        assert on is True and _open() == torch.device("cuda", 0)
        with compile_ahead("cuda") as inner:
            assert inner is False and _open() == torch.device("cuda", 0), "the outer pass covers an inner one"
    assert _open() is None
    with pytest.raises(KeyError):
        with compile_ahead("cuda"):
            raise KeyError("inside")
    assert _open() is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with compile_ahead("cuda") as on:
        assert on is False


@pytest.fixture
def ahead(monkeypatch):
    """Calls behave as inside an open block (which on CPU tensors they never are): the plans they would make are
    recorded instead, with their ahead flag."""
    made = []
    monkeypatch.setattr(interface, "_ahead", lambda q: True)
    monkeypatch.setattr(interface, "_new_plan", lambda *a, **kw: made.append(kw.get("ahead", False)))
    monkeypatch.setattr(interface, "_PLANS", {})
    return made


def test_calls_inside_the_block_compile_instead_of_launching(ahead):
    """Each entry point hands its call to the plan maker with ahead=True and returns an output of the real one's
    shape and dtype (v's head dim where it differs) without a plan; a pooled window's output is on q's grid."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 40, 4, 32, generator=g), torch.randn(2, 50, 4, 32, generator=g)
    v = torch.randn(2, 50, 4, 16, generator=g)
    out = block_sparse_attn(q, k, v)
    assert out.shape == (2, 40, 4, 16) and out.dtype == q.dtype
    cu = torch.tensor([0, 30, 80], dtype=torch.int32)
    out = block_sparse_attn_varlen(q.reshape(80, 4, 32), k.reshape(100, 4, 32), v.reshape(100, 4, 16), cu,
                                   torch.tensor([0, 40, 100], dtype=torch.int32), 50, 60)
    assert out.shape == (80, 4, 16)
    grid = torch.randn(1, 14, 14, 3, 2, 16, generator=g).bfloat16()
    wq, wk, wv = grid.unbind(3)
    pooled = wq[:, ::2, ::2].contiguous()
    out = window_attn(pooled, wk, wv, (8, 8), q_window_size=(4, 4))
    assert out.shape == pooled.shape and out.dtype == torch.bfloat16
    assert ahead == [True, True, True] and not interface._PLANS


def test_inputs_are_checked_before_the_pass(ahead):
    """A bad call fails inside the block as it would outside, before anything compiles."""
    q = torch.randn(1, 16, 2, 32)
    with pytest.raises(ValueError, match="head"):
        block_sparse_attn(q, torch.randn(1, 16, 3, 32), torch.randn(1, 16, 3, 32))
    with pytest.raises(ValueError, match="window_size"):
        window_attn(*torch.randn(3, 1, 8, 8, 2, 16).unbind(0), (0, 4))
    assert ahead == []


def test_calls_on_another_device_are_not_ahead(no_interpreter, monkeypatch):
    """Only calls on the block's device compile instead of launching ("cuda" covers every index)."""
    on = lambda dev: interface._ahead(_Fake(dev))  # noqa: E731
    with compile_ahead("cuda:1"):
        assert on("cuda:1") and not on("cuda:0") and not on("cpu")
    with compile_ahead("cuda"):
        assert on("cuda:0") and on("cuda:1") and not on("cpu")
    assert not on("cuda:1")


class _Fake:
    """A stand-in for a tensor on a given device (only .device is read)."""

    def __init__(self, device):
        self.device = torch.device(device)


def test_an_async_compile_mode_already_open_declines_the_block(no_interpreter):
    """Another AsyncCompileMode open on this thread (Triton allows one): parallel_compiles and compile_ahead
    yield False instead of raising, and the tuner's warmups compile through the open one."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    from sam_sparse.kernels import triton_attn

    with ThreadPoolExecutor(1) as pool, AsyncCompileMode(pool):
        with triton_attn.parallel_compiles() as parallel:
            assert parallel is False
        with compile_ahead("cuda") as on:
            assert on is False and _open() is None


def test_failed_compiles_leave_the_cache_and_finished_ones_become_kernels(no_interpreter, monkeypatch):
    """After a parallel_compiles block, a compile that raised is gone from the kernel cache (the next launch
    compiles again and reports), a finalized one is its kernel, and one still running (another thread's) stays;
    _finished waits for a launch's compile that is still a future."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from triton.runtime._async_compile import FutureKernel

    from sam_sparse.kernels import triton_attn

    def future(result=None, error=None, finalized=False):
        f = Future()
        if error is not None:
            f.set_exception(error)
        elif result is not None:
            f.set_result(result)
        k = FutureKernel.__new__(FutureKernel)  # its constructor differs between Tritons; these two fields do not
        k.future, k.kernel = f, (result if finalized else None)
        return k

    failed, done, running, waiting = (future(error=RuntimeError("ptxas")), future("kernel", finalized=True),
                                      future(), future("kernel b"))
    caches = {"a": failed, "b": done, "c": running, "d": waiting, "e": "compiled"}
    fake = SimpleNamespace(device_caches={0: (caches, None, None, None, None)})
    monkeypatch.setattr(triton_attn, "_attn_fwd", fake)
    monkeypatch.setattr(triton_attn, "_split_combine", SimpleNamespace(device_caches={}))
    with triton_attn.parallel_compiles() as parallel:
        assert parallel
    assert caches == {"b": "kernel", "c": running, "d": waiting, "e": "compiled"}
    assert triton_attn._finished(done) == "kernel" and triton_attn._finished("compiled") == "compiled"


# What the child process runs: Triton's own binder and cache key (an sm90 target, no GPU needed) for every launch
# and warmup of _attn_fwd, with run() recording them instead of compiling.
SPECIALIZATIONS = r"""
import torch
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import compute_cache_key, create_function_from_signature
from sam_sparse.kernels import triton_attn as ta

keys = {True: set(), False: set()}  # warmup? -> cache keys
bind = create_function_from_signature(ta._attn_fwd.signature, ta._attn_fwd.params, make_backend(GPUTarget("cuda", 90, 32)))

def run(*args, grid, warmup, **options):
    options.update(debug=options.get("debug", ta._attn_fwd.debug) or knobs.runtime.debug,
                   instrumentation_mode=knobs.compilation.instrumentation_mode)
    _, spec, opts = bind(*args, **options)
    keys[warmup].add(compute_cache_key({}, spec, opts))

ta._attn_fwd.run = run

def qkv(shape, dtype, offset):  # q, k, v: views of one projection, at `offset` elements into its storage
    n = torch.Size(shape).numel()
    return torch.empty(n + offset, dtype=dtype)[offset:].view(shape).unbind(-3)

def check(name, q, k, v, pads=(None, None), **kw):
    keys[True].clear(), keys[False].clear()
    args = (q, k, v, None, None, None, None, None, q.shape[-1] ** -0.5, 128)
    ta.make_plan(*args, ahead=True, **kw)
    tuned = []
    real = ta._tune
    ta._tune = lambda key, candidates, *a, **k: tuned.extend(candidates) or candidates[0]
    ta.make_plan(*args, **kw)  # the candidates the tuner would time
    ta._tune = real
    for cfg in tuned:  # each launched, as the tuner's timing and the call do
        ta.make_plan(*args, config=cfg, **kw)(q, k, v, None, None, None, None, None, None, *pads)
    missing = keys[False] - keys[True]
    print(name, len(keys[True]), len(keys[False]), len(missing))
    assert keys[False] and not missing, f"{name}: {len(missing)} of {len(keys[False])} launched kernels not compiled ahead"

for offset in (0, 1):  # q at an unaligned offset too
    q, k, v = qkv((2, 4096, 3, 8, 56), torch.bfloat16, offset)
    check(f"global block, offset {offset}", q, k, v)
q, k, v = qkv((1, 64, 64, 3, 8, 56), torch.bfloat16, 0)
pad = torch.randn(3, 8, 56, dtype=torch.bfloat16)
check("14 x 14 windows overhanging the grid", q, k, v, (pad[1], pad[2]), window=(14, 14))
pooled = q.unflatten(1, (32, 2)).unflatten(3, (32, 2)).amax(dim=(2, 4))
check("pooled queries", pooled, k, v, (pad[1], pad[2]), window=(14, 14), q_window=(7, 7))
q, k, v = qkv((2, 256, 256, 3, 2, 56), torch.bfloat16, 0)
check("8 x 8 windows", q, k, v, (pad[1, :2], pad[2, :2]), window=(8, 8))
print("OK")
"""


def test_the_pass_compiles_what_the_calls_launch():
    """make_plan(ahead=True) warms up the very kernels (Triton's cache keys for an sm90 target) that the real call
    launches: each candidate the tuner times and the plan it keeps, for a global block (q at an unaligned offset
    too: the warmup's output stand-in is allocated as an output is), windows overhanging their grid (two
    launches), pooled queries and many small windows. In a child process: the compiled kernel's JITFunction
    (this one may run Triton's interpreter), no GPU."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.runtime._async_compile", reason="this Triton has no async compiles")
    env = dict(os.environ, TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="", SAM_SPARSE_TUNE_CACHE="0")
    res = subprocess.run([sys.executable, "-c", SPECIALIZATIONS], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-2000:] + res.stderr[-3000:]
