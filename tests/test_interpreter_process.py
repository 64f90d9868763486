"""The test command on a machine with a CUDA GPU (tests/conftest.py): the compiled kernel in this process,
the interpreter tests in a child process. The decision itself is checked on any machine, with CUDA faked."""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Node ids to run instead of every interpreter test (the check of the decision below runs one).
ONLY = "SAM_SPARSE_INTERPRETER_TESTS"


def pytest_child(args, env, timeout):
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="no CUDA GPU: the interpreter tests run in this process")
def test_interpreter_tests_in_a_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.pop("SAM_SPARSE_FORCE_TRITON", None)
    for name in (ONLY, "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT"):  # the child is its own session
        env.pop(name, None)
    selection = os.environ.get(ONLY, "").split() or ["tests"]
    # With pytest-xdist installed (as on the GPU machines here), the child spreads the interpreter tests over
    # the cores: they are CPU-bound, and one process would run them for many minutes.
    parallel = ["-n", "auto"] if importlib.util.find_spec("xdist") is not None and not os.environ.get(ONLY) else []
    proc = pytest_child(["-m", "interpreter", *parallel, *selection], env, timeout=3600)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "needs Triton's interpreter" not in proc.stdout, tail


def test_a_cuda_machine_runs_the_interpreter_tests_in_a_child(tmp_path):
    """With torch.cuda.is_available() faked True: no TRITON_INTERPRET in this process, the interpreter
    tests skipped with a reason that says where they run, the reference tests run, and the child
    process (no GPU visible) runs the interpreter tests and passes."""
    (tmp_path / "fake_cuda.py").write_text(textwrap.dedent("""
        import os
        import torch

        # As CUDA does: no device when CUDA_VISIBLE_DEVICES is empty.
        torch.cuda.is_available = lambda: os.environ.get("CUDA_VISIBLE_DEVICES") != ""
    """))
    interpreted = "tests/test_kernel.py::test_kernel_decoder_shapes_and_gqa"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTEST_PLUGINS="fake_cuda", **{ONLY: interpreted})
    for name in ("TRITON_INTERPRET", "SAM_SPARSE_FORCE_TRITON", "CUDA_VISIBLE_DEVICES"):
        env.pop(name, None)
    runner = "tests/test_interpreter_process.py::test_interpreter_tests_in_a_child_process"
    proc = pytest_child(["-rA", interpreted, "tests/test_kernel.py::test_reference_varlen_and_empty_rows", runner],
                        env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "2 passed, 1 skipped" in out, out[-4000:]
    assert f"PASSED {runner}" in out and "PASSED tests/test_kernel.py::test_reference_varlen_and_empty_rows" in out, out[-4000:]
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert len(skipped) == 1 and "tests/test_kernel.py" in skipped[0], out[-4000:]
    assert f"needs Triton's interpreter, which cannot share a process with the compiled kernel: run in a child " \
           f"process by {runner}" in skipped[0], out[-4000:]
