"""The GPU suite for torch.compile's path: block_sparse_attn and window_attn traced as triton ops, their kernel
launched from Inductor's generated code (no Python of sam_sparse per call), against the float64 oracle and
against the same calls run eagerly; plans that use TMA descriptors fall back to the custom op, which the
generated code then calls.

Inductor allocates the compiled outputs, so they cannot be poisoned beforehand: a row the kernel leaves
unwritten shows as a mismatch with the eager output, which is poisoned-checked elsewhere (test_gpu*.py).

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu
"""

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from gpu_helpers import FLOOR, GPU_MARKS, ROW_FLOOR, rnd, seeded
from oracle import check_attention, check_window
from sam_sparse.kernels import BlockLayout, block_sparse_attn, window_attn

pytestmark = GPU_MARKS


def compiled_with_code(fn, *args):
    """(output, Inductor's generated source) of fn compiled fullgraph with Inductor."""
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    return out, "\n".join(code)


# (name, B, grid, window, q pooled?, H, D, dtype, mask?, rel-pos?): Hiera's windows at head dim 72 (bf16), a
# q-pooled block whose windows overhang the grid (a launch group with padding keys, fp16, head dim 56, a
# block mask), SAM's windows with rel-pos in fp32.
WINDOW_CASES = [
    ("hiera", 2, (32, 32), (8, 8), False, 2, 72, torch.bfloat16, False, False),
    ("pooled-overhang", 1, (36, 36), (16, 16), True, 4, 56, torch.float16, True, False),
    ("sam-relpos", 1, (20, 20), (7, 7), False, 4, 64, torch.float32, False, True),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[c[0] for c in WINDOW_CASES])
def test_compiled_window_attn_launches_the_kernel_from_inductor(case):
    name, B, (GH, GW), (wh, ww), pooled, H, D, dtype, masked, rel = case
    seed, g = seeded()
    q, k, v = rnd(g, B, GH, GW, 3, H, D, dtype=dtype).unbind(3)  # views of one fused projection
    kp, vp = rnd(g, H, D, dtype=dtype), rnd(g, H, D, dtype=dtype)
    q_window = None
    if pooled:  # Hiera's q pooling: max over each 2 x 2 cell
        q = q.unflatten(1, (GH // 2, 2)).unflatten(3, (GW // 2, 2)).amax(dim=(2, 4))
        q_window = (wh // 2, ww // 2)
    windows = -(-GH // wh) * -(-GW // ww)
    qh, qw = q_window or (wh, ww)
    mask = layout = None
    if masked:
        mask = torch.rand(B * windows, H, -(-qh * qw // 64), -(-wh * ww // 64), device="cuda", generator=g) < 0.6
        mask[0, 0, 0] = False  # an empty query block: zeros
        layout = BlockLayout.from_mask(mask, 64)
    rel_h = rel_w = None
    if rel:
        n = q.shape[1] * q.shape[2]
        rel_h = (rnd(g, B, H, wh, n, dtype=dtype) * 2).transpose(-1, -2)
        rel_w = (rnd(g, B, H, ww, n, dtype=dtype) * 2).transpose(-1, -2)
    bs = 64 if masked else None

    def f(q, k, v):
        return window_attn(q, k, v, (wh, ww), layout, q_window_size=q_window, k_pad=kp, v_pad=vp, rel_h=rel_h,
                           rel_w=rel_w, block_size=bs)

    out, code = compiled_with_code(f, q, k, v)
    assert "_attn_fwd" in code and "sam_sparse.window_attn" not in code, (
        f"{name}: the generated code should launch the kernel itself, not call the custom op")
    check_window(out, q, k, v, (wh, ww), kp, vp, mask, rel_h, rel_w, None, bs or 128, seed, FLOOR, ROW_FLOOR,
                 q_window=q_window)
    eager = f(q, k, v)
    torch.testing.assert_close(out, eager, rtol=0, atol=0, msg=lambda m: f"seed {seed}: compiled != eager\n{m}")


@pytest.mark.parametrize("dtype,via", [(torch.float32, "kernel"), (torch.bfloat16, "custom op (TMA)")])
def test_compiled_global_attention(dtype, via):
    """A global block of 4096 tokens (SAM's rel-pos, a block mask): fp32, on pointer loads, is launched from
    Inductor's code; bf16 on Hopper picks K / V through TMA descriptors, which a triton op cannot carry, so
    the generated code calls the custom op. Both equal the eager call."""
    seed, g = seeded()
    q, k, v = rnd(g, 1, 4096, 3, 2, 64, dtype=dtype).unbind(2)
    rel_h = (rnd(g, 1, 2, 64, 4096, dtype=dtype) * 2).transpose(-1, -2)
    rel_w = (rnd(g, 1, 2, 64, 4096, dtype=dtype) * 2).transpose(-1, -2)
    mask = torch.rand(1, 2, 32, 32, device="cuda", generator=g) < 0.4
    mask[0, 1, 5] = False
    layout = BlockLayout.from_mask(mask, 128)

    def f(q, k, v):
        return block_sparse_attn(q * 1.0, k, v, layout, rel_h=rel_h, rel_w=rel_w)

    out, code = compiled_with_code(f, q, k, v)
    tma = torch.cuda.get_device_capability()[0] >= 9 and dtype != torch.float32
    expect_custom = via != "kernel" and tma
    assert ("sam_sparse.block_sparse_attn" in code) == expect_custom, f"{via}: the op the generated code calls"
    check_attention(out, q, k, v, mask, 128, seed, FLOOR, ROW_FLOOR, rel_h=rel_h, rel_w=rel_w)
    assert (out[0, 5 * 128:6 * 128, 1] == 0).all(), f"seed {seed}: an empty query block must give zeros"
    torch.testing.assert_close(out, f(q, k, v), rtol=0, atol=0, msg=lambda m: f"seed {seed}: compiled != eager\n{m}")


def test_traced_launch_of_a_split_plan():
    """A plan whose keys are split over programs (SPLIT_K: partial results in a workspace, then the merge
    kernel), launched through launch_traced inside a triton op and compiled: both kernels in the generated
    code, the result equal to the plan's own call."""
    from sam_sparse.kernels import triton_attn

    seed, g = seeded()
    q, k, v = (rnd(g, 1, n, 1, 128, dtype=torch.float16) for n in (256, 2000, 2000))
    plan = triton_attn.make_plan(q, k, v, None, None, None, None, None, 128 ** -0.5, 128,
                                 config=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, SPLIT_K=4))
    assert plan.split is not None and plan.traceable

    @torch.library.triton_op("sam_sparse_test::split_attn", mutates_args=())
    def split_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        plan.launch_traced(q, k, v, None, None, None, None, None, None, None, None, out)
        return out

    out, code = compiled_with_code(lambda q, k, v: split_attn(q, k, v) * 2, q, k, v)
    assert "_attn_fwd" in code and "_split_combine" in code
    torch.testing.assert_close(out, 2 * plan(q, k, v, None, None, None, None, None, None), rtol=0, atol=0)
    check_attention(out / 2, q, k, v, None, 128, seed, FLOOR, ROW_FLOOR)
