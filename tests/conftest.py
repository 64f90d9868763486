"""Test-session setup shared by every test file.

Triton reads TRITON_INTERPRET when a kernel is defined, so one process runs the kernel either compiled or
in Triton's interpreter, never both; it is decided here, before anything imports the kernel module:

- no CUDA GPU (or TRITON_INTERPRET=1 given): the interpreter. The tests marked `interpreter` (those
  that use the triton_kernel / triton_mass fixtures, or route CPU tensors to the kernel) run it on CPU
  tensors; tests/gpu is skipped.
- a CUDA GPU (TRITON_INTERPRET unset or 0): the compiled kernel, and tests/gpu runs it. The
  `interpreter` tests cannot run in this process: tests/test_interpreter_process.py runs them in a
  child process with TRITON_INTERPRET=1 and no GPU visible, and here they are skipped, saying so.

Every other test uses the PyTorch reference path on CPU tensors either way: SAM_SPARSE_DEVICE=cpu makes
the jobs and commands that default to "cuda" when it is available (the CLI without --device, bench) run on
the CPU here too, so their exact-equality checks mean the same on both kinds of machine. The GPU suite
names its device.
"""

import os

import pytest

INTERPRETER_FIXTURES = ("triton_kernel", "triton_mass", "triton_upscale", "triton_few_keys", "triton_resize",
                        "triton_rotary")
COVERED_BY = "tests/test_interpreter_process.py::test_interpreter_tests_in_a_child_process"


def _interpret() -> bool:
    given = os.environ.get("TRITON_INTERPRET")
    if given is not None:
        return given == "1"
    import torch

    return not torch.cuda.is_available()


os.environ["TRITON_INTERPRET"] = "1" if _interpret() else "0"
os.environ["SAM_SPARSE_DEVICE"] = "cpu"  # whatever the shell says: the checks below assume the CPU
# The GPU suite tunes launch configs with several workers sharing one GPU: such timings must not reach the
# user's tuning cache (~/.cache/sam-sparse/tuning), which every later process on this GPU would trust.
os.environ["SAM_SPARSE_TUNE_CACHE"] = "0"


def _share_cores() -> None:
    """Under pytest-xdist, each worker takes its share of the cores for torch's CPU threads: by default every
    worker would start one thread per core, and on a many-core GPU machine (8 workers plus the interpreter
    child's 16) the oversubscribed suite ran several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        # The scripts tests run as child processes (the benchmarks' --quick runs) take the same share: with a thread
        # per core beside the other workers' threads, a CPU timing inside them swung tenfold (test_bench_video's
        # quick frame: 3.3 s against 0.35 s for the same frame hooked, CI on 764ca7e).
        os.environ["OMP_NUM_THREADS"] = str(share)


_share_cores()


@pytest.hookimpl(tryfirst=True)  # before `-m interpreter` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in INTERPRETER_FIXTURES):
            item.add_marker(pytest.mark.interpreter)
        if os.environ["TRITON_INTERPRET"] != "1" and item.get_closest_marker("interpreter"):
            item.add_marker(pytest.mark.skip(
                reason=f"needs Triton's interpreter, which cannot share a process with the compiled kernel: "
                       f"run in a child process by {COVERED_BY}"))


def interpreted(monkeypatch, name: str):
    """The Triton kernel module sam_sparse.kernels.<name>, with CPU tensors routed to it through the interpreter."""
    import importlib

    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET before any import"
    monkeypatch.setenv("SAM_SPARSE_FORCE_TRITON", "1")
    module = importlib.import_module(f"sam_sparse.kernels.{name}")
    assert module.INTERPRET
    return module


def interpreter_fixture(name: str):
    """A fixture giving the Triton kernel module sam_sparse.kernels.<name>, run by the interpreter."""
    def fixture(monkeypatch):
        return interpreted(monkeypatch, name)

    fixture.__doc__ = f"The kernel module {name}, run by Triton's interpreter on CPU tensors."
    return pytest.fixture(fixture)


# Their names are in INTERPRETER_FIXTURES (triton_mass lives in tests/test_block_mass.py).
triton_kernel = interpreter_fixture("triton_attn")  # the attention kernel
triton_upscale = interpreter_fixture("triton_upscale")  # the upscaling head
triton_few_keys = interpreter_fixture("triton_few_keys")  # few-key attention + LayerNorm
triton_resize = interpreter_fixture("triton_resize")  # resize + threshold
triton_rotary = interpreter_fixture("triton_rotary")  # rotary encoding in place
