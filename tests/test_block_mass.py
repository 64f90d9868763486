"""block_attention_mass (calibration statistics, issue 13) against a float64 oracle that forms the
whole attention matrix, with the full N x N bias built explicitly, on fresh random inputs every case
(the seed is in every failure message).

The PyTorch path runs on the CPU; the Triton kernel (triton_mass.py) runs in Triton's interpreter,
which tests/conftest.py switches on before anything imports Triton. tests/gpu/test_gpu_block_mass.py
runs the compiled kernel on SAM's shapes.

Error unit: probability mass per query (|mass - oracle| / queries in the block). Both paths see the
same rounded inputs as the oracle and compute in float32, so the bound does not depend on the input
dtype: a few float32 ulps of the logits. float64 inputs are computed in float64, and only the float32
result is rounded.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from oracle import key_rows_cols
from sam_sparse.kernels import block_mass
from sam_sparse.kernels.block_mass import block_attention_mass
from sam_sparse.kernels.interface import HAS_TRITON  # platforms without Triton: the PyTorch path still serves

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

TOL = {torch.float64: 2e-7, torch.float32: 5e-6, torch.float16: 5e-6, torch.bfloat16: 5e-6}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


def inputs(g, dtype, B, Nq, Nk, H, Hk, D, rel=None, noncontig=False, rel_scale=2.0):
    """q (B, Nq, H, D), k (B, Nk, Hk, D), rel_h (B, H, Nq, kh), rel_w (B, H, Nq, kw) or None."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if noncontig:  # strided views of one fused projection (as SAM's qkv), rel-pos stored (B, H, k, N)
        assert Nq == Nk
        q, k, _ = rnd(B, Nq, 3, H, D).unbind(2)
        k = k[:, :, :Hk]
    else:
        q, k = rnd(B, Nq, H, D), rnd(B, Nk, Hk, D)
    rel_h = rel_w = None
    if rel is not None:
        rel_h = (rnd(B, H, rel[0], Nq) * rel_scale).transpose(-1, -2)
        rel_w = (rnd(B, H, rel[1], Nq) * rel_scale).transpose(-1, -2)
        if not noncontig:
            rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
    return q, k, rel_h, rel_w


def oracle_mass(q, k, rel_h=None, rel_w=None, key_tile=None, scale=None, bs=128):
    """float64 (B, H, QB, KB) from the whole float64 (B, H, Nq, Nk) attention matrix."""
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(H // Hk, dim=2)) * scale
    if rel_h is not None:
        rows, cols = key_rows_cols(rel_h.shape[-1], rel_w.shape[-1], key_tile)
        logits = logits + (rel_h.double()[..., rows] + rel_w.double()[..., cols])  # the full N x N bias
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)  # no key at all: the query adds nothing
    p = torch.softmax(logits.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    qb, kb = -(-Nq // bs), -(-Nk // bs)
    p = F.pad(p, (0, kb * bs - Nk, 0, qb * bs - Nq))
    return p.view(B, H, qb, bs, kb, bs).sum(dim=(3, 5))


def queries_per_block(nq, bs):
    """float64 (QB, 1): how many queries each query block holds (the last one may be partial)."""
    return torch.tensor([min(bs, nq - s) for s in range(0, nq, bs)], dtype=torch.float64)[:, None]


def check(mass, ref, q, bs, seed):
    assert mass.dtype == torch.float32 and mass.shape == ref.shape, f"seed {seed}: {mass.dtype} {tuple(mass.shape)}"
    assert torch.isfinite(mass).all(), f"seed {seed}: NaN/inf in the mass"
    err = ((mass.double() - ref).abs() / queries_per_block(q.shape[1], bs)).max().item()
    assert err <= TOL[q.dtype], f"seed {seed}: error {err:.3g} per query > {TOL[q.dtype]:.1g} ({q.dtype})"


# (B, Nq, Nk, H, Hk, D, block size, rel grid, key tile)
CASES = {
    "gqa-partial-blocks": (2, 100, 70, 2, 1, 32, 32, None, None),
    "raster-bias-gqa": (1, 256, 256, 4, 2, 16, 64, (16, 16), None),
    "tiled-keys": (2, 256, 256, 2, 2, 32, 64, (16, 16), (4, 8)),
    "sam-window": (2, 196, 196, 3, 3, 64, 128, (14, 14), None),
    "odd-grid-tiled": (1, 300, 300, 2, 1, 16, 16, (3, 100), (3, 20)),
    "cross-nq-ne-nk": (1, 40, 200, 2, 2, 48, 64, (10, 20), (5, 4)),
}


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("case", CASES)
def test_torch_path_matches_oracle(dtype, case):
    B, Nq, Nk, H, Hk, D, bs, rel, tile = CASES[case]
    seed, g = seeded()
    q, k, rh, rw = inputs(g, dtype, B, Nq, Nk, H, Hk, D, rel)
    mass = block_attention_mass(q, k, rel_h=rh, rel_w=rw, key_tile=tile, block_size=bs)
    check(mass, oracle_mass(q, k, rh, rw, tile, bs=bs), q, bs, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_sum_to_queries_per_block(dtype):
    seed, g = seeded()
    q, k, rh, rw = inputs(g, dtype, 2, 150, 150, 4, 4, 32, (10, 15))
    mass = block_attention_mass(q, k, rel_h=rh, rel_w=rw, block_size=64)
    assert (mass >= 0).all(), f"seed {seed}"
    want = queries_per_block(150, 64)[:, 0].float().expand(2, 4, -1)
    torch.testing.assert_close(mass.sum(-1), want, rtol=1e-5, atol=0, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("tile", [None, (4, 4)])
def test_noncontiguous_inputs_and_scale(tile):
    seed, g = seeded()
    q, k, rh, rw = inputs(g, torch.bfloat16, 2, 144, 144, 4, 2, 32, (12, 12), noncontig=True)
    assert not (q.is_contiguous() or k.is_contiguous() or rh.is_contiguous())
    mass = block_attention_mass(q, k, rel_h=rh, rel_w=rw, key_tile=tile, softmax_scale=0.3, block_size=32)
    check(mass, oracle_mass(q, k, rh, rw, tile, scale=0.3, bs=32), q, 32, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_and_infinite_bias(dtype):
    """Logits in the hundreds, a planted key block that takes nearly all the mass, and queries whose
    every key has a -inf bias (they attend to nothing, as in block_sparse_attn, and add no mass)."""
    seed, g = seeded()
    q, k, rh, rw = inputs(g, dtype, 1, 256, 256, 2, 2, 32, (16, 16), rel_scale=40.0)
    tile = (8, 8)
    # Keys of tile 1 (grid rows 0-7, cols 8-15) are key block 1 at block size 64: plant +80 there.
    rh, rw = rh.clone(), rw.clone()
    rh[:, :, 64:128] = 0
    rw[:, :, 64:128] = 0
    rh[:, :, 64:128, :8] += 80
    rw[:, :, 64:128, 8:] += 80
    rh[:, :, :5] = float("-inf")  # queries 0-4: no key at all
    mass = block_attention_mass(q, k, rel_h=rh, rel_w=rw, key_tile=tile, block_size=64)
    check(mass, oracle_mass(q, k, rh, rw, tile, bs=64), q, 64, seed)
    assert (mass[:, :, 1, 1] > 0.99 * 64).all(), f"seed {seed}: the planted block holds {mass[:, :, 1, 1]}"
    want = torch.tensor([59.0, 64, 64, 64]).expand(1, 2, 4)
    torch.testing.assert_close(mass.sum(-1), want, rtol=1e-5, atol=0, msg=lambda m: f"seed {seed}: {m}")


def test_chunks_do_not_align_with_blocks(monkeypatch):
    """Force 7-row chunks (3 heads x 100 keys x 7 rows): chunk edges fall inside query blocks."""
    seed, g = seeded()
    q, k, rh, rw = inputs(g, torch.float32, 1, 100, 100, 3, 3, 16, (10, 10))
    whole = block_attention_mass(q, k, rel_h=rh, rel_w=rw, key_tile=(5, 5), block_size=16)
    monkeypatch.setattr(block_mass, "_MAX_SCORE_ELEMS", 3 * 100 * 7)
    chunked = block_attention_mass(q, k, rel_h=rh, rel_w=rw, key_tile=(5, 5), block_size=16)
    check(chunked, oracle_mass(q, k, rh, rw, (5, 5), bs=16), q, 16, seed)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_empty_sides_and_no_grad():
    q, k = torch.randn(2, 0, 4, 16), torch.randn(2, 50, 4, 16)
    assert block_attention_mass(q, k, block_size=16).shape == (2, 4, 0, 4)
    assert block_attention_mass(k, q, block_size=16).shape == (2, 4, 4, 0)
    q = torch.randn(1, 20, 2, 16, requires_grad=True)
    mass = block_attention_mass(q, q.detach(), block_size=16)
    assert not mass.requires_grad and mass.shape == (1, 2, 2, 2)


def _bad(**over):
    args = dict(q=torch.randn(1, 64, 4, 16), k=torch.randn(1, 64, 2, 16), rel_h=None, rel_w=None,
                key_tile=None, softmax_scale=None, block_size=32)
    args.update(over)
    q, k = args.pop("q"), args.pop("k")
    return lambda: block_attention_mass(q, k, **args)


REL = dict(rel_h=torch.randn(1, 4, 64, 8), rel_w=torch.randn(1, 4, 64, 8))
BAD = {
    "q not 4-D": (_bad(q=torch.randn(64, 4, 16)), "expected 4-D"),
    "int dtype": (_bad(q=torch.ones(1, 64, 4, 16, dtype=torch.int32)), "supported dtypes"),
    "dtype mismatch": (_bad(k=torch.randn(1, 64, 2, 16).half()), "share dtype and device"),
    "batch mismatch": (_bad(k=torch.randn(2, 64, 2, 16)), "batch"),
    "heads": (_bad(k=torch.randn(1, 64, 3, 16)), "multiple of nheads_k"),
    "headdim mismatch": (_bad(k=torch.randn(1, 64, 2, 32)), "headdim"),
    "headdim unsupported": (_bad(q=torch.randn(1, 64, 4, 20), k=torch.randn(1, 64, 2, 20)), "headdim 20"),
    "block size": (_bad(block_size=100), "block_size=100"),
    "scale": (_bad(softmax_scale="big"), "softmax_scale"),
    "rel alone": (_bad(rel_h=REL["rel_h"]), "pass both or neither"),
    "tile without rel": (_bad(key_tile=(2, 2)), "pass it only with them"),
    "rel shape": (_bad(rel_h=torch.randn(1, 4, 63, 8), rel_w=REL["rel_w"]), r"rel_h has shape \(1, 4, 63, 8\)"),
    "grid size": (_bad(rel_h=torch.randn(1, 4, 64, 4), rel_w=REL["rel_w"]), "kh \\* kw = 32 != seqlen_k = 64"),
    "tile does not divide": (_bad(**REL, key_tile=(3, 4)), "whole tiles"),
    "tile not a pair": (_bad(**REL, key_tile=4), "pair"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_inputs_raise_clear_errors(name):
    call, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------------------------------------
# The Triton kernel, in the interpreter (small shapes: the interpreter runs each program in numpy)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def triton_mass():
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET before any import"
    from sam_sparse.kernels import triton_mass

    assert triton_mass.INTERPRET
    return triton_mass


# (B, Nq, Nk, H, Hk, D, block size, rel grid, key tile, kernel tiles, non-contiguous)
TRITON_CASES = {
    "gqa-partial-tiles": (2, 100, 70, 2, 1, 32, 32, None, None, (32, 16), False),
    "raster-bias": (1, 128, 128, 2, 2, 16, 64, (8, 16), None, (32, 32), False),
    "tiled-headdim-80": (1, 128, 128, 2, 1, 80, 64, (16, 8), (4, 2), None, True),
    "window-one-block": (1, 49, 49, 2, 2, 16, 64, (7, 7), None, (16, 64), False),
}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_kernel_matches_oracle(triton_mass, dtype, case):
    B, Nq, Nk, H, Hk, D, bs, rel, tile, tiles, noncontig = TRITON_CASES[case]
    seed, g = seeded()
    q, k, rh, rw = inputs(g, dtype, B, Nq, Nk, H, Hk, D, rel, noncontig=noncontig)
    mass = triton_mass.mass_triton(q, k, rh, rw, tile, D**-0.5, bs, tiles=tiles)
    check(mass, oracle_mass(q, k, rh, rw, tile, bs=bs), q, bs, seed)


@needs_triton
def test_triton_kernel_large_and_infinite_bias(triton_mass):
    seed, g = seeded()
    q, k, rh, rw = inputs(g, torch.bfloat16, 1, 64, 64, 2, 2, 16, (8, 8), rel_scale=40.0)
    rh[:, :, :3] = float("-inf")  # queries 0-2 attend to nothing
    mass = triton_mass.mass_triton(q, k, rh, rw, None, 0.25, 32, tiles=(16, 16))
    check(mass, oracle_mass(q, k, rh, rw, None, scale=0.25, bs=32), q, 32, seed)
    torch.testing.assert_close(mass.sum(-1), torch.tensor([29.0, 32]).expand(1, 2, 2), rtol=1e-5, atol=0)
