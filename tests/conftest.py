"""Test-session setup shared by every test file."""

import os

# Triton reads TRITON_INTERPRET when a kernel is defined, so it must be set before anything imports the
# kernel module. It only matters where SAM_SPARSE_FORCE_TRITON=1 routes CPU tensors to the kernel
# (test_kernel.py does that per test); every other CPU test uses the PyTorch reference path.
os.environ.setdefault("TRITON_INTERPRET", "1")
