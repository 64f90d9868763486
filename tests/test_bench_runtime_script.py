"""scripts/bench_runtime.py's first-call probe on a CPU: the code its child process runs formats and compiles,
and its wrapper of the tuner tells classes that were timed from those the disk cache (or a lone candidate)
decided. The first call itself is timed on the GPU machine (docs/benchmarks.md)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from sam_sparse.kernels import triton_attn

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_runtime.py"
if str(_PATH.parent) not in sys.path:
    sys.path.insert(0, str(_PATH.parent))  # as when the script runs: its folder first (it imports bench_e2e)
_spec = importlib.util.spec_from_file_location("bench_runtime_script", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_first_call_code_formats_and_compiles():
    code = bench.FIRST_CALL.format(scripts=str(_PATH.parent), model="sam2.1_hiera_b+", ahead=False)
    compile(code, "first_call", "exec")
    assert "'sam2.1_hiera_b+'" in code and "compile_ahead = False" in code


def test_first_call_rows_compare_compiling_ahead(monkeypatch, tmp_path):
    """The fresh-process row runs twice, compile_ahead on and off, each with caches of its own (the off row must
    not find the on row's kernels); the next-process rows (on, off, and without the tuning cache) reuse the on
    row's caches. The same for SAM's and SAM 2's encoders."""
    runs = []

    class Done:
        stdout, stderr = 'FIRST {"first_forward_s": 1.0}', ""

    def run(cmd, env, **kwargs):
        runs.append(("compile_ahead = True" in cmd[-1], env["TRITON_CACHE_DIR"], env["SAM_SPARSE_CACHE"],
                     env.get("SAM_SPARSE_TUNE_CACHE")))
        return Done()

    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setattr(bench, "record", lambda out, **row: None)
    for model in ("sam2.1_hiera_b+", "vit_h"):
        runs.clear()
        bench.section_firstcall(tmp_path, model)
        assert [r[0] for r in runs] == [True, False, True, False, True]
        assert runs[0][1] != runs[1][1] and runs[0][2] != runs[1][2], "the fresh off row has caches of its own"
        assert runs[2][1:3] == runs[3][1:3] == runs[4][1:3] == runs[0][1:3] and runs[4][3] == "0"


def test_first_call_wrapper_counts_timings_not_cache_hits(monkeypatch, tmp_path):
    """The wrapper (the code before the model is built, run here) records each class the tuner meets once, with
    the timings its candidates got: none for a class the disk cache decided."""
    monkeypatch.setattr(triton_attn, "_tune", triton_attn._tune)  # restored after the test
    monkeypatch.setattr(triton_attn, "_TUNED", {})
    monkeypatch.setattr(triton_attn, "_DISK", {})
    disk = tmp_path / "tuning.json"
    monkeypatch.setattr(triton_attn, "_tune_file", lambda device: disk)
    code = bench.FIRST_CALL.format(scripts=str(_PATH.parent), model="unused", ahead=True)
    scope = {}
    exec(code.split("\nname = ")[0], scope)  # the imports and the wrapper, not the GPU part
    a, b = dict(BLOCK_M=64, num_stages=2), dict(BLOCK_M=64, num_stages=3)
    timed = lambda cfg: 1.0 if cfg is a else 2.0  # noqa: E731
    cpu = torch.device("cpu")
    assert triton_attn._tune(("class", 1), [a, b], timed, cpu) == a
    assert triton_attn._tune(("class", 1), [a, b], timed, cpu) == a  # this process's table: not a new class
    assert triton_attn._tune(("lone",), [a], timed, cpu) == a
    triton_attn._TUNED.clear()  # as the next process: the class from the disk cache
    assert triton_attn._tune(("class", 1), [a, b], timed, cpu) == a
    got = [(c["key"], c["candidates"], c["timings"]) for c in scope["classes"]]
    assert got == [("('class', 1)", 2, 4), ("('lone',)", 1, 0), ("('class', 1)", 2, 0)], got
    assert all(c["s"] >= 0 for c in scope["classes"])


@pytest.mark.parametrize("section", ["firstcall", "sam2b8"])
def test_sections_are_listed(section):
    assert section in bench.__doc__
