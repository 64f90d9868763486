"""block_attention_mass on the GPU: the compiled Triton kernel (the path CUDA tensors take) against the
PyTorch path run in float64 on the same inputs. Part of the GPU suite:

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu

CI's CPU run collects and skips it (no CUDA). Every case draws fresh random inputs (the seed is in the
failure message). Error unit: probability mass per query (|mass - reference| / queries in the block).
"""


import pytest
import torch

from gpu_helpers import DTYPES, GPU_MARKS, seeded
from sam_sparse.kernels import block_mass
from sam_sparse.kernels.block_mass import block_attention_mass, mass_torch

pytestmark = GPU_MARKS

# The kernel computes the logits in fp32 from the same rounded inputs (fp32: 3xTF32 under the default
# "highest" matmul precision), so every dtype gets the same float32-level bound.
TOL = 1e-5


@pytest.fixture
def triton_only(monkeypatch):
    """Make sure CUDA tensors take the Triton path: the PyTorch path refuses float16/bfloat16/float32."""
    def refuse(q, *args):
        assert q.dtype == torch.float64, "CUDA tensors went to the PyTorch path"
        return mass_torch(q, *args)

    monkeypatch.setattr(block_mass, "mass_torch", refuse)


def inputs(g, dtype, B, Nq, Nk, H, Hk, D, rel, noncontig=False, rel_scale=2.0):
    def rnd(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    if noncontig:  # strided views of one fused projection, as SAM's qkv gives them
        q, k, _ = rnd(B, Nq, 3, H, D).unbind(2)
        k = k[:, :, :Hk]
    else:
        q, k = rnd(B, Nq, H, D), rnd(B, Nk, Hk, D)
    # (B, H, k, N) storage, as the patcher hands rel-pos over
    rel_h = (rnd(B, H, rel[0], Nq) * rel_scale).transpose(-1, -2)
    rel_w = (rnd(B, H, rel[1], Nq) * rel_scale).transpose(-1, -2)
    return q, k, rel_h, rel_w


def check(mass, q, k, rh, rw, tile, bs, seed):
    torch.cuda.synchronize()
    assert mass.dtype == torch.float32 and mass.is_cuda, f"seed {seed}"
    assert torch.isfinite(mass).all(), f"seed {seed}: NaN/inf in the mass"
    ref = mass_torch(q.double(), k.double(), rh.double(), rw.double(), tile, q.shape[-1] ** -0.5, bs)
    nq = q.shape[1]
    per_block = torch.tensor([min(bs, nq - s) for s in range(0, nq, bs)], device="cuda", dtype=torch.float64)[:, None]
    err = ((mass.double() - ref.double()).abs() / per_block).max().item()
    assert err <= TOL, f"seed {seed}: error {err:.3g} per query > {TOL:.1g} ({q.dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tile", [None, (8, 16)], ids=["raster", "tiled"])
def test_sam_global_layer(triton_only, dtype, tile):
    """SAM's global layer: 64 x 64 tokens, 12 heads of 64, block 128, rel-pos, fused-qkv views."""
    seed, g = seeded()
    q, k, rh, rw = inputs(g, dtype, 1, 4096, 4096, 12, 12, 64, (64, 64), noncontig=True)
    mass = block_attention_mass(q, k, rel_h=rh, rel_w=rw, key_tile=tile, block_size=128)
    assert mass.shape == (1, 12, 32, 32)
    check(mass, q, k, rh, rw, tile, 128, seed)
    rows = mass.sum(-1)
    torch.testing.assert_close(rows, torch.full_like(rows, 128.0), rtol=1e-5, atol=0, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_partial_blocks_wide_head_large_bias(triton_only, dtype):
    """GQA, lengths off the block grid, vit_h's head dim 80, logits in the hundreds, queries with no key."""
    seed, g = seeded()
    q, k, rh, rw = inputs(g, dtype, 2, 300, 333, 4, 2, 80, (9, 37), rel_scale=40.0)
    rh[:, :, :3] = float("-inf")  # queries 0-2: every key excluded, they add no mass
    mass = block_attention_mass(q, k, rel_h=rh, rel_w=rw, key_tile=(3, 37), block_size=64)
    check(mass, q, k, rh, rw, (3, 37), 64, seed)
    first = mass[:, :, 0].sum(-1)
    torch.testing.assert_close(first, torch.full_like(first, 61.0), rtol=1e-5, atol=0, msg=lambda m: f"seed {seed}: {m}")
