"""Test-session setup shared by every test file."""

import os

import pytest

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before anything imports the
# kernel module. It only matters where SAM_SPARSE_FORCE_TRITON=1 routes CPU tensors to the kernel
# (the triton_kernel fixture below does that per test); every other CPU test uses the PyTorch reference path.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def triton_kernel(monkeypatch):
    """The Triton kernel module, with CPU tensors routed to it through the interpreter."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET before any import"
    monkeypatch.setenv("SAM_SPARSE_FORCE_TRITON", "1")
    from sam_sparse.kernels import triton_attn

    assert triton_attn.INTERPRET
    return triton_attn
