"""kernels.rotary_embedding_ (RoPE in place; SAM 2's memory attention) against a float64 oracle written
from the rotation's definition, on fresh random inputs every case (the seed is in every failure message).

The Triton kernel (triton_rotary.py) runs in Triton's interpreter on CPU tensors (tests/conftest.py); the
torch path (reference.py) runs on the CPU as for users there, and must equal SAM 2's own apply_rotary_enc
bit for bit; tests/gpu/test_gpu_memory_kernel.py runs the compiled kernel on SAM 2's shapes. Tokens a call must not
touch (pointer tokens: row -1; keys past a view) must keep their exact bytes.
"""

import math

import pytest
import torch
from test_upscale_kernel import seeded

from sam_sparse.kernels import rotary_embedding_

# (B, H, N, D, T): a table repeated over several frames, N off the kernel's 16-token tile; SAM 2.1's head
# dim 256 with one head; a head dim whose half (12) is not a power of two; one token.
CASES = [(2, 3, 37, 16, 12), (1, 1, 70, 256, 35), (2, 2, 19, 24, 19), (1, 2, 1, 32, 1)]
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to the vector's size


def table(g, T, half):
    angles = torch.rand(T, half, generator=g, dtype=torch.float64) * 2 * math.pi
    return torch.cos(angles).float(), torch.sin(angles).float()


def oracle(x, cos, sin, rows):
    """float64: token n's pairs rotated by the angle of table row rows[n]; rows < 0 unchanged."""
    out = x.double().clone()
    for n, p in enumerate(rows.tolist()):
        if p < 0:
            continue
        a, b = out[..., n, 0::2].clone(), out[..., n, 1::2].clone()
        c, s = cos[p].double(), sin[p].double()
        out[..., n, 0::2] = a * c - b * s
        out[..., n, 1::2] = a * s + b * c
    return out


def check(got, ref, before, rows, dtype, seed, what):
    assert got.dtype == dtype, (what, seed)
    untouched = rows < 0
    if untouched.any():
        assert torch.equal(got[..., untouched, :], before[..., untouched, :]), f"{what}: untouched tokens changed (seed {seed})"
    err = (got.double() - ref).abs().amax(-1)  # per token
    scale = ref.abs().amax(-1).clamp(min=1)
    bad = err > TOL[dtype] * scale
    assert not bad.any(), f"{what}: {int(bad.sum())} tokens off, worst {float((err / scale).max()):.2e} (seed {seed})"
    assert torch.isfinite(got).all(), (what, seed)


# The triton case is marked `interpreter` by hand: conftest marks tests by the fixtures they name, and this
# one is reached through getfixturevalue (on a GPU machine it runs in the interpreter's child process).
@pytest.fixture(params=[pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def path(request):
    if request.param == "triton":
        request.getfixturevalue("triton_rotary")
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_repeated_table_against_oracle(path, case, dtype):
    B, H, N, D, T = case
    seed, g = seeded()
    cos, sin = table(g, T, D // 2)
    x = torch.randn(B, H, N, D, generator=g).to(dtype)
    before = x.clone()
    rows = torch.arange(N) % T
    ref = oracle(before, cos, sin, rows)
    out = rotary_embedding_(x, cos, sin)
    assert out is x
    check(x, ref, before, rows, dtype, seed, f"{path} {case} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positions_skip_pointer_tokens(path, dtype):
    """Packed memories: two rows of frames, each followed by pointer tokens (-1), int32 and int64 rows."""
    seed, g = seeded()
    T, D = 9, 32
    cos, sin = table(g, T, D // 2)
    rows = torch.cat([torch.arange(2 * T) % T, torch.full((4,), -1), torch.arange(T), torch.full((3,), -1)])
    for index_dtype in (torch.int32, torch.int64):
        x = torch.randn(1, 1, rows.numel(), D, generator=g).to(dtype)
        before = x.clone()
        rotary_embedding_(x, cos, sin, rows.to(index_dtype))
        check(x, oracle(before, cos, sin, rows), before, rows, dtype, seed, f"{path} positions {index_dtype}")


def test_strided_views_in_place(path):
    """SAM 2's layout: (B, N, H * D) projections seen as (B, H, N, D), and a view of the first keys only:
    the keys past the view (pointer tokens) keep their bytes."""
    seed, g = seeded()
    B, H, N, D, T = 2, 2, 20, 16, 10
    cos, sin = table(g, T, D // 2)
    base = torch.randn(B, N + 5, H * D, generator=g)
    x = base.view(B, N + 5, H, D).transpose(1, 2)  # (B, H, N + 5, D), not contiguous
    before = x.clone()
    rotary_embedding_(x[:, :, :N], cos, sin)
    rows = torch.cat([torch.arange(N) % T, torch.full((5,), -1)])
    check(x, oracle(before, cos, sin, rows), before, rows, torch.float32, seed, f"{path} strided view")


def test_torch_path_equals_sam2_apply_rotary_enc():
    """On the CPU the patched memory attention must give SAM 2's q and k bit for bit."""
    pos = pytest.importorskip("sam2.modeling.position_encoding")
    seed, g = seeded()
    side, D = 6, 64
    freqs = pos.compute_axial_cis(dim=D, end_x=side, end_y=side, theta=10000.0)
    q = torch.randn(2, 1, side * side, D, generator=g)
    k = torch.randn(2, 1, 3 * side * side, D, generator=g)
    want_q, want_k = pos.apply_rotary_enc(q, k, freqs_cis=freqs, repeat_freqs_k=True)
    cos, sin = freqs.real.contiguous(), freqs.imag.contiguous()
    got_q, got_k = rotary_embedding_(q.clone(), cos, sin), rotary_embedding_(k.clone(), cos, sin)
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k), seed


def test_matches_sam2_in_the_interpreter(triton_rotary):
    """The kernel against SAM 2's complex float32 rotation: equal to float32 rounding."""
    pos = pytest.importorskip("sam2.modeling.position_encoding")
    seed, g = seeded()
    side, D = 5, 256
    freqs = pos.compute_axial_cis(dim=D, end_x=side, end_y=side, theta=10000.0)
    k = torch.randn(1, 1, 2 * side * side, D, generator=g)
    _, want = pos.apply_rotary_enc(k[:, :, :side * side], k, freqs_cis=freqs, repeat_freqs_k=True)
    got = rotary_embedding_(k.clone(), freqs.real.contiguous(), freqs.imag.contiguous())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{m} (seed {seed})")


def test_empty_and_bad_inputs(path):
    cos, sin = torch.ones(4, 8), torch.zeros(4, 8)
    empty = torch.zeros(1, 1, 0, 16)
    assert rotary_embedding_(empty, cos, sin) is empty
    x = torch.randn(1, 1, 4, 16)
    bad = [
        (torch.randn(4, 16), cos, sin, None, r"expected \(B, H, N, D\)"),
        (torch.randn(1, 1, 4, 15), cos, sin, None, "D even"),
        (torch.randn(1, 1, 16, 4).transpose(-1, -2), cos, sin, None, "last dim contiguous"),
        (x.long(), cos, sin, None, "dtype"),
        (x, torch.ones(4, 7), sin, None, "half of x's head dim"),
        (x, cos, torch.zeros(3, 8), None, "the same shape"),
        (x, cos.double().half(), sin, None, "float32"),
        (x, cos, sin, torch.zeros(3, dtype=torch.int32), "positions"),
        (x, cos, sin, torch.zeros(4), "positions"),
    ]
    for args in bad:
        with pytest.raises(ValueError, match=args[-1]):
            rotary_embedding_(*args[:-1])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_under_torch_compile_fullgraph(backend):
    """Inside a fullgraph torch.compile (SAM2VideoPredictorVOS compiles its memory attention so) the rotation
    is the custom op sam_sparse::rotary_embedding_: no graph break, the view it rotates written through to
    its base as in eager, the rows marked -1 untouched."""
    seed = torch.seed()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 40, 16, generator=g)
    cos, sin = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    rows = torch.tensor([0, 1, 2, 3, 4, -1, -1, -1])  # the last three tokens: pointer-like, left alone

    def fn(t):
        t = t * 1.0
        rotary_embedding_(t[:, :, :32], cos, sin)
        rotary_embedding_(t[:, :, 32:], cos, sin, rows)
        return t

    want = fn(x.clone())
    got = torch.compile(fn, backend=backend, fullgraph=True)(x.clone())
    torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")
    assert torch.equal(got[:, :, -3:], x[:, :, -3:]), f"seed {seed}: rows marked -1 changed"
