"""kernels.upscale_project (the fused upscaling head of maskgen's factored decoder) against an independent
float64 oracle, on fresh random inputs every case (the seed is in every failure message).

The Triton kernel (triton_upscale.py) runs in Triton's interpreter on CPU tensors (tests/conftest.py);
the torch path (reference.py) runs on the CPU as it does for users there. tests/gpu/test_gpu_upscale.py
runs the compiled kernel at SAM's shapes. Outputs are poisoned with NaN before the kernel writes them,
and checked globally and per output row.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sam_sparse.kernels import upscale_project
from sam_sparse.kernels.interface import HAS_TRITON
from sam_sparse.kernels.reference import upscale_project_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

# (B, h, w, C, C1, C2, M): h*w not a multiple of the interpreter's 16-pixel tile; a multiple of it;
# C a multiple of 16 but not of 32; SAM's channel ratios (C1 = C/4, C2 = C/8) at a small C; one mask.
SHAPES = [(2, 5, 7, 32, 16, 16, 3), (1, 4, 8, 48, 32, 32, 1), (3, 3, 3, 16, 64, 32, 4), (2, 6, 4, 64, 16, 16, 3)]


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


def make_inputs(g, B, h, w, C, C1, C2, M, dtype=torch.float32, noncontig=False, skips=None):
    """skips: None, or the batch of the skip maps (1: shared, B: per sample); stored channels-last, as
    strided views."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    x = rnd(B, C, h * w).transpose(1, 2) if noncontig else rnd(B, h * w, C)  # channels-first storage
    a = dict(x=x.to(dtype), grid=(h, w), w1=rnd(C, C1, 2, 2, scale=C ** -0.5), b1=rnd(C1),
             ln_weight=1 + 0.5 * rnd(C1), ln_bias=rnd(C1), eps=1e-6, w2=rnd(C1, C2, 2, 2, scale=C1 ** -0.5),
             b2=rnd(C2), hyper=rnd(B, M, C2))
    if skips is not None:
        a["add1"] = rnd(skips, 2 * h, 2 * w, C1).permute(0, 3, 1, 2)
        a["add2"] = rnd(skips, 4 * h, 4 * w, C2).permute(0, 3, 1, 2)
    return a


def oracle(x, grid, w1, b1, ln_weight, ln_bias, eps, w2, b2, hyper, add1=None, add2=None):
    """float64 (B, M, 4h, 4w), pixel by pixel: each input pixel's 2 x 2 first-stage and 4 x 4 second-stage
    sub-pixels from einsums over the weights (no convolution call), placed at 4y + 2a + c, 4x + 2d + e."""
    B, _, C = x.shape
    h, w = grid
    d = lambda t: t.double()  # noqa: E731
    gelu = lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))  # noqa: E731
    y = torch.einsum("byxc,cokl->byxklo", d(x).view(B, h, w, C), d(w1)) + d(b1)
    if add1 is not None:  # (b, o, 2y + k, 2x + l) -> (b, y, x, k, l, o)
        y = y + d(add1).reshape(add1.shape[0], -1, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1)
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + eps)
    y = gelu(y * d(ln_weight) + d(ln_bias))
    z = torch.einsum("byxklo,opmn->byxklmnp", y, d(w2)) + d(b2)
    if add2 is not None:  # (b, p, 4y + 2k + m, 4x + 2l + n) -> (b, y, x, k, l, m, n, p)
        z = z + d(add2).reshape(add2.shape[0], -1, h, 2, 2, w, 2, 2).permute(0, 2, 5, 3, 6, 4, 7, 1)
    z = gelu(z)
    out = torch.einsum("byxklmnp,bqp->bqykmxln", z, d(hyper))
    return out.reshape(B, hyper.shape[1], 4 * h, 4 * w)


def check(out, ref, seed, what, rel=2e-5):
    assert out.dtype == torch.float32 and out.shape == ref.shape, (what, seed, out.dtype, out.shape)
    assert torch.isfinite(out).all(), f"{what}: a value the kernel never wrote (NaN poison) or inf (seed {seed})"
    err = (out.double() - ref).abs()
    scale = ref.abs().amax().item()
    assert err.amax().item() <= rel * scale, f"{what}: max error {err.amax().item():.3g} vs scale {scale:.3g} (seed {seed})"
    rows = err.amax(-1) / ref.abs().amax(-1).clamp(min=1e-3 * scale)  # (B, M, 4h): each output row alone
    assert rows.amax().item() <= 20 * rel, f"{what}: worst row error {rows.amax().item():.3g} (seed {seed})"


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_the_float64_oracle(triton_upscale, shape, dtype):
    seed, g = seeded()
    a = make_inputs(g, *shape, dtype=dtype)
    ref = oracle(**a)
    w1p, w2p = triton_upscale.pack_weights(a["w1"], a["w2"])
    poisoned = torch.full(ref.shape, float("nan"))
    out = triton_upscale.upscale_project_triton(a["x"], a["grid"], w1p, a["b1"], a["ln_weight"], a["ln_bias"],
                                                a["eps"], w2p, a["b2"], a["hyper"], out=poisoned)
    assert out is poisoned
    check(out, ref, seed, f"kernel {shape} {dtype}")
    check(upscale_project(**a), ref, seed, f"upscale_project {shape} {dtype}")  # the public path, same kernel


@needs_triton
@pytest.mark.parametrize("skips", ["shared", "per sample"])
def test_kernel_adds_skip_maps(triton_upscale, skips):
    """SAM 2's head: a (C1, 2h, 2w) map added before the LayerNorm and a (C2, 4h, 4w) map before the last
    GELU, one for every sample (its image's high-resolution features) or one per sample."""
    seed, g = seeded()
    B = 3
    a = make_inputs(g, B, 5, 6, 32, 16, 16, 3, skips=1 if skips == "shared" else B)
    ref = oracle(**a)
    assert (ref - oracle(**{**a, "add1": None})).abs().amax() > 0.1  # each map matters
    assert (ref - oracle(**{**a, "add2": None})).abs().amax() > 0.1
    w1p, w2p = triton_upscale.pack_weights(a["w1"], a["w2"])
    poisoned = torch.full(ref.shape, float("nan"))
    out = triton_upscale.upscale_project_triton(a["x"], a["grid"], w1p, a["b1"], a["ln_weight"], a["ln_bias"],
                                                a["eps"], w2p, a["b2"], a["hyper"], a["add1"], a["add2"], out=poisoned)
    check(out, ref, seed, f"skips {skips}")
    check(upscale_project(**a), ref, seed, f"upscale_project, skips {skips}")
    check(upscale_project_reference(**a), ref, seed, f"torch path, skips {skips}")


@needs_triton
def test_kernel_reads_strided_inputs_and_any_batch(triton_upscale):
    seed, g = seeded()
    a = make_inputs(g, 3, 5, 6, 32, 16, 16, 3, noncontig=True)
    assert not a["x"].is_contiguous()
    a["hyper"] = a["hyper"].transpose(1, 2).contiguous().transpose(1, 2)  # (B, M, C2) stored (B, C2, M)
    check(upscale_project(**a), oracle(**a), seed, "strided x and hyper")
    empty = make_inputs(g, 0, 5, 6, 32, 16, 16, 3)
    assert upscale_project(**empty).shape == (0, 3, 20, 24)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_path_matches_the_float64_oracle(dtype):
    seed, g = seeded()
    a = make_inputs(g, 2, 5, 7, 32, 16, 16, 3, dtype=dtype, noncontig=True)
    ref = oracle(**a)
    out = upscale_project_reference(**a)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    err = (out.double() - ref).abs().amax().item()
    assert err <= (1e-12 if dtype == torch.float64 else 2e-5) * ref.abs().amax().item(), (err, seed)


def test_bad_inputs_say_what_was_wrong_and_what_is_accepted():
    _, g = seeded()
    a = make_inputs(g, 2, 5, 7, 32, 16, 16, 3)
    cases = [
        (dict(grid=(5, 6)), r"grid=\(5, 6\): expected \(h, w\) with h \* w = 35"),
        (dict(x=a["x"][0]), r"x: shape \(35, 32\).*expected \(batch, h \* w, channels\)"),
        (dict(x=a["x"].int()), "dtype torch.int32; expected float32"),
        (dict(w1=a["w1"][:, :, :1]), r"w1: shape \(32, 16, 1, 2\); expected \(32, C1, 2, 2\)"),
        (dict(w2=a["w2"][:8]), r"w2: shape \(8, 16, 2, 2\); expected \(16, C2, 2, 2\)"),
        (dict(ln_bias=a["ln_bias"][:3]), r"ln_bias: shape \(3,\); expected \(16,\)"),
        (dict(hyper=a["hyper"][:1]), r"hyper: shape \(1, 3, 16\).*expected \(2, M, 16\)"),
        (dict(add1=torch.zeros(2, 16, 10, 12)), r"add1: shape \(2, 16, 10, 12\).*expected \(2 or 1, 16, 10, 14\)"),
        (dict(add2=torch.zeros(3, 16, 20, 28)), r"add2: shape \(3, 16, 20, 28\).*expected \(2 or 1, 16, 20, 28\)"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            upscale_project(**{**a, **change})


@needs_triton
def test_kernel_refuses_channels_it_cannot_tile(triton_upscale):
    _, g = seeded()
    a = make_inputs(g, 1, 2, 2, 24, 16, 16, 1)
    with pytest.raises(ValueError, match="C=24, C1=16, C2=16: the kernel needs C a multiple of 16 and C1, C2 powers of two"):
        upscale_project(**a)
    b = make_inputs(g, 1, 2, 2, 32, 48, 16, 1)
    with pytest.raises(ValueError, match="C1=48"):
        upscale_project(**b)
    wide = make_inputs(g, 1, 2, 2, 32, 256, 16, 1)  # its (C1, C2) weight tile would not fit in shared memory
    with pytest.raises(ValueError, match="C1=256.*powers of two from 16 to 128"):
        upscale_project(**wide)
    many = make_inputs(g, 1, 2, 2, 32, 16, 16, 65)
    with pytest.raises(ValueError, match="65 projections per sample; the kernel takes at most 64"):
        upscale_project(**many)


@needs_triton
def test_batches_past_the_launch_grid_run_in_slices(triton_upscale, monkeypatch):
    """More samples than CUDA's grid axis holds (65535) run as several launches: with the limit set to 2,
    5 samples take 3, each writing its own slice (NaN poison elsewhere would show), shared skip maps too."""
    seed, g = seeded()
    monkeypatch.setattr(triton_upscale, "MAX_GRID_Y", 2)
    a = make_inputs(g, 5, 3, 4, 16, 16, 16, 2, skips=1)
    ref = oracle(**a)
    w1p, w2p = triton_upscale.pack_weights(a["w1"], a["w2"])
    poisoned = torch.full(ref.shape, float("nan"))
    out = triton_upscale.upscale_project_triton(a["x"], a["grid"], w1p, a["b1"], a["ln_weight"], a["ln_bias"],
                                                a["eps"], w2p, a["b2"], a["hyper"], a["add1"], a["add2"], out=poisoned)
    check(out, ref, seed, "5 samples in launches of 2")
    per_sample = make_inputs(g, 5, 3, 4, 16, 16, 16, 2, skips=5)
    check(upscale_project(**per_sample), oracle(**per_sample), seed, "per-sample skip maps in launches of 2")


@needs_triton
def test_tuning_space_is_pruned_to_configs_that_fit(triton_upscale):
    """The run-time tuner times only configs whose K step divides C (the K loop has no tail) and whose pixel
    tile a small grid does not leave mostly idle; every channel count the API accepts keeps one."""
    cfgs = triton_upscale.CONFIGS
    assert len(triton_upscale.prune(cfgs, {"HW": 4096}, C=256)) == len(cfgs)  # SAM's head: all 7 are timed
    for c, hw in ((48, 35), (96, 4096), (16, 9), (272, 100)):
        kept = triton_upscale.prune(cfgs, {"HW": hw}, C=c, C1=64, C2=32, M=3)
        assert kept and all(c % k.kwargs["BLOCK_K"] == 0 for k in kept), (c, kept)
        assert len(kept) == 1 or all(k.kwargs["BLOCK_P"] < max(64, 2 * hw) for k in kept), (hw, kept)


@needs_triton
@pytest.mark.parametrize("which", ["plain", "--skips", "--few-keys"])
def test_kernel_compiles_for_hopper_within_its_registers(which):
    """tests/hopper_compile.py compiles every tuning config for sm_90a (no GPU needed; its own process, with
    the compiler instead of the interpreter, which skips the compiler's checks) at a 256 -> 64 -> 32 head,
    with and without skip maps, and the few-key kernel (triton_few_keys.py) at 4096 x 256 rows, 8 heads of
    7 keys: each compiles, fits the H200's 227 KiB of shared memory, and some fit in registers with no
    spilling."""
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this Triton has no bundled ptxas")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.pop("SAM_SPARSE_FORCE_TRITON", None)
    proc = subprocess.run([sys.executable, str(root / "tests" / "hopper_compile.py"), *([which] if which != "plain" else [])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) >= 4, proc.stdout
    assert all(r["shared_bytes"] <= 227 * 1024 for r in rows), rows
    assert any(r["spill_bytes"] == 0 for r in rows), rows
