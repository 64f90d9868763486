"""kernels.few_key_attention_norm (the image-to-token attention of maskgen's factored decoder, with its
residual add, LayerNorm and positional add) against an independent float64 oracle, on fresh random inputs
every case (the seed is in every failure message).

The Triton kernel (triton_few_keys.py) runs in Triton's interpreter on CPU tensors (tests/conftest.py);
the torch path (reference.py) runs on the CPU as it does for users there. tests/gpu/test_gpu_upscale.py
runs the compiled kernel at SAM's shapes. Outputs are poisoned with NaN before the kernel writes them,
and checked globally and per row.
"""

import math

import pytest
import torch
from test_upscale_kernel import check, seeded  # the same checks: global, then per row of the last dim

from sam_sparse.kernels import few_key_attention_norm
from sam_sparse.kernels.interface import HAS_TRITON
from sam_sparse.kernels.reference import few_key_attention_norm_reference

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

# (B, N, H, T, C, shared): N not a multiple of the interpreter's 16-row tile; a multiple of it; SAM 1's
# 8 heads x 7 tokens (T padded to 8); SAM 2's 8 x 8; one head of one key (T_P raised so H * T_P = 16);
# queries and residual shared by every sample (a decoder's first layer) or per sample.
SHAPES = [(2, 37, 2, 3, 32, False), (3, 32, 8, 7, 64, True), (2, 20, 8, 8, 16, False), (1, 9, 1, 1, 32, False),
          (3, 21, 4, 5, 128, True)]


def make_inputs(g, B, N, H, T, C, shared=False, dtype=torch.float32, noncontig=False, pos=True):
    """Scores of a few units (peaked softmaxes, far from uniform); q and the residual stored channels-first
    (strided views) when noncontig."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    def rows(b):
        return rnd(b, C, N).transpose(1, 2) if noncontig else rnd(b, N, C)

    bq = 1 if shared else B
    return dict(q=rows(bq).to(dtype), k=rnd(B, H, T, C, scale=3 * C ** -0.5), v=rnd(B, H, T, C),
                residual=rows(bq).to(dtype), ln_weight=1 + 0.5 * rnd(C), ln_bias=rnd(C), eps=1e-5,
                softmax_scale=0.7, k_bias=rnd(B, H, T), out_bias=rnd(C), pos=rnd(1, N, C) if pos else None)


def oracle(q, k, v, residual, ln_weight, ln_bias, eps, softmax_scale=1.0, k_bias=None, out_bias=None, pos=None):
    """float64, row by row of each head, with explicit exponentials (no softmax or layer_norm call)."""
    d = lambda t: t.double()  # noqa: E731
    B, H, T, C = k.shape
    s = torch.einsum("bnc,bhtc->bnht", d(q).expand(B, -1, -1), d(k)) * softmax_scale
    if k_bias is not None:
        s = s + d(k_bias)[:, None]
    e = torch.exp(s - s.amax(-1, keepdim=True))
    o = torch.einsum("bnht,bhtc->bnc", e / e.sum(-1, keepdim=True), d(v))
    x = d(residual) + o + (0 if out_bias is None else d(out_bias))
    mean = x.sum(-1, keepdim=True) / C
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / C
    y = (x - mean) / torch.sqrt(var + eps) * d(ln_weight) + d(ln_bias)
    return y, (None if pos is None else y + d(pos))


def run_kernel(module, a, t_padded=None):
    """The launcher on NaN-poisoned outputs, with the API's float32 conversions."""
    from sam_sparse.kernels.few_keys import padded_keys

    B, H, T, C = a["k"].shape
    poisoned = tuple(torch.full((B, a["q"].shape[1], C), float("nan")) for _ in range(2))
    f = {n: a[n].float().contiguous() for n in ("k", "v", "ln_weight", "ln_bias", "k_bias", "out_bias")}
    y, y_pos = module.few_key_attention_norm_triton(
        a["q"], f["k"], f["v"], a["residual"], f["ln_weight"], f["ln_bias"], a["eps"], a["softmax_scale"],
        f["k_bias"], f["out_bias"], a["pos"], t_padded or padded_keys(H, T), out=poisoned)
    assert y is poisoned[0] and y_pos is poisoned[1]
    return y, y_pos


@needs_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_float64_oracle(triton_few_keys, shape, dtype):
    seed, g = seeded()
    a = make_inputs(g, *shape, dtype=dtype)
    ref, ref_pos = oracle(**a)
    y, y_pos = run_kernel(triton_few_keys, a)
    check(y, ref, seed, f"kernel {shape} {dtype}")
    check(y_pos, ref_pos, seed, f"kernel + pos {shape} {dtype}")
    y, y_pos = few_key_attention_norm(**a)  # the public path, same kernel
    check(y, ref, seed, f"few_key_attention_norm {shape} {dtype}")
    check(y_pos, ref_pos, seed, f"few_key_attention_norm + pos {shape} {dtype}")


@needs_triton
def test_kernel_reads_strided_inputs_without_optional_ones(triton_few_keys):
    """q and residual stored channels-first; no key bias, output bias or pos (y_pos is None); an empty batch."""
    seed, g = seeded()
    a = make_inputs(g, 3, 19, 4, 3, 32, noncontig=True, pos=False)
    a.update(k_bias=None, out_bias=None)
    assert not a["q"].is_contiguous() and not a["residual"].is_contiguous()
    y, y_pos = few_key_attention_norm(**a)
    assert y_pos is None
    check(y, oracle(**a)[0], seed, "strided, no optional inputs")
    empty = make_inputs(g, 0, 19, 4, 3, 32)
    y, y_pos = few_key_attention_norm(**empty)
    assert y.shape == y_pos.shape == (0, 19, 32)


@needs_triton
def test_a_shared_residual_and_per_sample_queries(triton_few_keys):
    """A decoder's later layers: per-sample queries, and (here) one residual for all; pos per sample."""
    seed, g = seeded()
    a = make_inputs(g, 3, 17, 2, 4, 32)
    a["residual"] = a["residual"][:1]
    a["pos"] = torch.randn(3, 17, 32, generator=g)
    ref, ref_pos = oracle(**a)
    y, y_pos = few_key_attention_norm(**a)
    check(y, ref, seed, "shared residual")
    check(y_pos, ref_pos, seed, "per-sample pos")


@needs_triton
def test_padded_keys_never_take_weight(triton_few_keys):
    """T = 3 keys padded to 4 per head: a huge value in the padding's place would show if the kernel read
    past T (the launcher's rows are (H * T) long, so a wrong index reads the next head's keys instead)."""
    seed, g = seeded()
    a = make_inputs(g, 2, 16, 4, 3, 32)
    ref, _ = oracle(**a)
    y, _ = run_kernel(triton_few_keys, a, t_padded=8)  # more padding than needed: the same result
    check(y, ref, seed, "T_P = 8 for T = 3")


@needs_triton
def test_batches_past_the_launch_grid_run_in_slices(triton_few_keys, monkeypatch):
    seed, g = seeded()
    monkeypatch.setattr(triton_few_keys, "MAX_GRID_Y", 2)
    for shared in (True, False):
        a = make_inputs(g, 5, 18, 2, 3, 16, shared=shared)
        ref, ref_pos = oracle(**a)
        y, y_pos = run_kernel(triton_few_keys, a)
        check(y, ref, seed, f"5 samples in launches of 2, shared {shared}")
        check(y_pos, ref_pos, seed, f"5 samples in launches of 2, shared {shared}, + pos")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_path_matches_the_float64_oracle(dtype):
    seed, g = seeded()
    for shape in SHAPES:
        a = make_inputs(g, *shape, dtype=dtype, noncontig=True)
        ref, ref_pos = oracle(**a)
        y, y_pos = few_key_attention_norm_reference(**a)
        assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = (1e-12 if dtype == torch.float64 else 2e-5) * ref.abs().amax().item()
        assert (y.double() - ref).abs().amax().item() <= tol, (shape, seed)
        assert (y_pos.double() - ref_pos).abs().amax().item() <= tol, (shape, seed)


def test_bad_inputs_say_what_was_wrong_and_what_is_accepted():
    _, g = seeded()
    a = make_inputs(g, 2, 9, 2, 3, 32)
    cases = [
        (dict(k=a["k"][0]), r"k: shape \(2, 3, 32\).*expected \(batch, heads, keys per head, channels\)"),
        (dict(q=a["q"][:, :, :16]), r"q: shape \(2, 9, 16\).*expected \(1 or 2, N, 32\)"),
        (dict(q=a["q"].int()), r"q: .*expected \(1 or 2, N, 32\)|dtype torch.int32; expected float32"),
        (dict(v=a["v"][:, :1]), r"v: shape \(2, 1, 3, 32\).*expected k's shape \(2, 2, 3, 32\)"),
        (dict(residual=a["residual"][:, :4]), r"residual: shape \(2, 4, 32\).*expected \(1 or 2, 9, 32\)"),
        (dict(k_bias=a["k_bias"][:, :, :2]), r"k_bias: shape \(2, 2, 2\); expected \(2, 2, 3\)"),
        (dict(out_bias=a["out_bias"][:3]), r"out_bias: shape \(3,\); expected \(32,\)"),
        (dict(pos=torch.zeros(3, 9, 32)), r"pos: shape \(3, 9, 32\).*expected \(1 or 2, 9, 32\)"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            few_key_attention_norm(**{**a, **change})


@needs_triton
def test_kernel_refuses_shapes_it_cannot_tile(triton_few_keys):
    _, g = seeded()
    with pytest.raises(ValueError, match="channels C=48: the kernel needs a power of two from 16 to 256"):
        few_key_attention_norm(**make_inputs(g, 1, 4, 2, 3, 48))
    with pytest.raises(ValueError, match="3 heads of 2 keys: the kernel needs a power of two"):
        few_key_attention_norm(**make_inputs(g, 1, 4, 3, 2, 32))
    with pytest.raises(ValueError, match="8 heads of 17 keys"):  # 8 x 32 > 128
        few_key_attention_norm(**make_inputs(g, 1, 4, 8, 17, 32))


@needs_triton
def test_tuning_space_is_pruned_to_configs_that_fit(triton_few_keys):
    cfgs = triton_few_keys.CONFIGS
    assert len(triton_few_keys.prune(cfgs, {"N": 4096}, C=256)) == len(cfgs)  # SAM's shape: all are timed
    for c, n in ((16, 5), (32, 4096), (256, 20)):
        kept = triton_few_keys.prune(cfgs, {"N": n}, C=c)
        assert kept and all(c % k.kwargs["BLOCK_C"] == 0 for k in kept), (c, kept)
        assert len(kept) == 1 or all(k.kwargs["BLOCK_N"] <= max(32, 2 * n) for k in kept), (n, kept)


def test_oracle_is_the_formula():
    """The oracle itself on a case worked by hand: one head, two keys, C = 2."""
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[[math.log(3.0), 0.0], [0.0, 0.0]]]])  # scores log 3 and 0: weights 3/4, 1/4
    v = torch.tensor([[[[4.0, 0.0], [0.0, 4.0]]]])  # output (3, 1); residual 0; mean 2, var 1
    y, _ = oracle(q, k, v, torch.zeros(1, 1, 2), torch.ones(2), torch.zeros(2), 0.0)
    assert torch.allclose(y, torch.tensor([[[1.0, -1.0]]], dtype=torch.float64))
