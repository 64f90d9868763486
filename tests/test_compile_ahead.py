"""kernels.compile_ahead on CPU: when its block is on, and what a call inside it does (interface.py). The compiles
themselves need a GPU: tests/gpu/test_gpu_hiera.py checks that nothing compiles after the block."""

import pytest
import torch

from sam_sparse.kernels import block_sparse_attn, block_sparse_attn_varlen, compile_ahead, interface, window_attn


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton.runtime._async_compile", reason="this Triton has no async compiles")


def test_the_block_is_on_for_a_gpu_only(no_interpreter, monkeypatch):
    """On for CUDA where Triton compiles; off on the CPU, in Triton's interpreter, and inside a block already
    open on this thread; off again after the block, an exception included."""
    with compile_ahead("cpu") as on:
        assert on is False and not getattr(interface._AHEAD, "on", False)
    with compile_ahead(torch.device("cuda", 0)) as on:
        assert on is True and interface._AHEAD.on
        with compile_ahead("cuda") as inner:
            assert inner is False and interface._AHEAD.on, "the outer pass covers an inner one"
    assert not interface._AHEAD.on
    with pytest.raises(KeyError):
        with compile_ahead("cuda"):
            raise KeyError("inside")
    assert not interface._AHEAD.on
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
