"""Compile workers (sam_sparse/kernels/compile_workers.py): warmup calls described without their data,
rebuilt in worker processes, and the pool that runs them. A probe stands in for a Triton kernel here (CPU);
tests/gpu/test_gpu_compile_workers.py compiles the attention kernel through real workers."""

import json
import os
import sys

import pytest
import torch

from sam_sparse.kernels import compile_workers as cw

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compile_probe import PROBE  # noqa: E402


def test_described_arguments_rebuild_to_what_triton_specializes_on():
    base = torch.zeros(64, dtype=torch.bfloat16)
    odd = base[3:]  # 6 bytes past a 16-byte boundary
    specs = [cw.describe(a) for a in (base, odd, 7, 0.5, True, None)]
    assert specs[0] == ("tensor", "bfloat16", base.data_ptr() % 16)
    rebuilt = [cw.rebuild(s) for s in specs]
    assert [(r.dtype, r.data_ptr() % 16) for r in rebuilt[:2]] == [(torch.bfloat16, base.data_ptr() % 16),
                                                                  (torch.bfloat16, odd.data_ptr() % 16)]
    assert rebuilt[1].data_ptr() % 16 != rebuilt[0].data_ptr() % 16
    assert rebuilt[2:] == [7, 0.5, True, None]
    with pytest.raises(TypeError, match="list"):
        cw.describe([1, 2])


def test_a_tma_descriptor_is_rebuilt_with_its_box():
    from triton.tools.tensor_descriptor import TensorDescriptor

    k = torch.zeros(2, 128, 4, 64, dtype=torch.float16)
    desc = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 64, 1, 64])
    back = cw.rebuild(cw.describe(desc))
    assert isinstance(back, TensorDescriptor)
    assert (list(back.shape), list(back.strides), list(back.block_shape)) == ([2, 128, 4, 64], list(k.stride()),
                                                                              [1, 64, 1, 64])
    assert back.base.dtype == torch.float16 and back.base.data_ptr() % 16 == 0


def test_warm_compiles_outside_recording_and_records_inside(tmp_path, monkeypatch):
    out = tmp_path / "probe.jsonl"
    monkeypatch.setenv("COMPILE_PROBE_OUT", str(out))
    x = torch.zeros(8)
    with cw.recording() as jobs:
        cw.warm(PROBE, x, 3, grid=(2, 1, 1), num_warps=4)
    assert not out.exists(), "a recorded warmup compiles nothing"
    assert jobs == [("compile_probe", "PROBE", [("tensor", "float32", x.data_ptr() % 16), ("value", 3)], (2, 1, 1),
                     {"num_warps": 4}, -1)]
    cw.warm(PROBE, x, 3, grid=(2, 1, 1), num_warps=4)
    assert json.loads(out.read_text())["args"][1] == 3
    cw.run_job(jobs[0])  # the worker's side, in this process
    assert len(out.read_text().splitlines()) == 2


def test_the_pool_compiles_in_worker_processes_and_reports_failures(tmp_path):
    out = tmp_path / "probe.jsonl"
    env = {**os.environ, "COMPILE_PROBE_OUT": str(out), "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    pool = cw.CompilePool(2, env=env)
    x = torch.zeros(8, dtype=torch.float16)[1:]
    good = [cw.job(PROBE, [x, i], (i + 1,), {"num_warps": 4}, -1) for i in range(4)]
    bad = cw.job(PROBE, [x], (1,), {"fail": True}, -1)
    try:
        results = pool.compile(good + [bad], local=False)  # only the workers compile
        assert [ok for ok, _ in results] == [True] * 4 + [False], results
        assert "told to fail" in results[-1][1]
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["args"][1] for r in lines) == [0, 1, 2, 3]
        assert {r["pid"] for r in lines} - {os.getpid()} == {r["pid"] for r in lines}, "compiled in the workers"
        assert all(r["args"][0] == ["stub", "torch.float16", x.data_ptr() % 16] for r in lines)
        # the pool survives a failed job and serves another batch with the same workers
        assert pool.compile(good[:1], local=False) == [(True, "")]
        procs = [w.proc for w in pool._workers]
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    finally:
        pool.close()
    assert all(p.wait(timeout=10) == 0 for p in procs), "closed workers exit"


def test_jobs_a_dead_worker_leaves_are_compiled_here(tmp_path, monkeypatch):
    out = tmp_path / "probe.jsonl"
    monkeypatch.setenv("COMPILE_PROBE_OUT", str(out))
    pool = cw.CompilePool(1, env={**os.environ, "PYTHONPATH": HERE})
    pool._start()
    pool._workers[0].proc.kill()
    pool._workers[0].proc.wait()
    try:
        results = pool.compile([cw.job(PROBE, [i], (1,), {}, -1) for i in range(3)])
    finally:
        pool.close()
    assert results == [(True, "")] * 3
    assert {json.loads(line)["pid"] for line in out.read_text().splitlines()} == {os.getpid()}


def test_this_thread_takes_over_a_job_a_worker_is_slow_with(tmp_path, monkeypatch):
    """A worker still starting Triton up (here: sleeping 20 s) does not hold the batch: once the queue is empty,
    the caller compiles what a worker has held longer than its own compile took, and its answer is dropped."""
    import time

    out = tmp_path / "probe.jsonl"
    monkeypatch.setenv("COMPILE_PROBE_OUT", str(out))
    monkeypatch.setenv("COMPILE_PROBE_PARENT", str(os.getpid()))
    pool = cw.CompilePool(1, env={**os.environ, "PYTHONPATH": HERE})
    try:
        assert pool.compile([cw.job(PROBE, [0], (1,), {}, -1)], local=False) == [(True, "")]  # the worker is up
        t = time.perf_counter()
        results = pool.compile([cw.job(PROBE, [i], (1,), {"slow_in_workers": 20}, -1) for i in range(2)])
        assert time.perf_counter() - t < 10, "the caller waited for the slow worker"
    finally:
        pool.close()
    assert results == [(True, "")] * 2
    assert pool.stats["here"] == 2 and pool.stats["failed"] == 0, pool.stats


def test_worker_count(monkeypatch):
    monkeypatch.setenv("SAM_SPARSE_COMPILE_WORKERS", "3")
    assert cw.worker_count() == 3
    monkeypatch.setenv("SAM_SPARSE_COMPILE_WORKERS", "many")
    with pytest.raises(ValueError, match="SAM_SPARSE_COMPILE_WORKERS='many'"):
        cw.worker_count()
    monkeypatch.delenv("SAM_SPARSE_COMPILE_WORKERS")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cw.worker_count() == 0
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert cw.worker_count() == 8


def test_the_tuner_sends_its_candidates_to_the_pool(monkeypatch):
    """_compile_in_parallel records each candidate's warmup calls and hands them to the pool as one batch."""
    from sam_sparse.kernels import triton_attn

    sent = []

    class FakePool:
        def compile(self, jobs):
            sent.append(jobs)

    monkeypatch.setattr(cw, "pool", lambda: FakePool())
    x = torch.zeros(4)
    compiled = []
    monkeypatch.setattr(PROBE, "warmup", lambda *a, **k: compiled.append(a), raising=False)

    def warmup(cfg):
        cw.warm(PROBE, x, cfg["BLOCK_M"], grid=(1,), num_warps=cfg["num_warps"])
        if cfg["BLOCK_M"] == 32:
            raise RuntimeError("a config whose plan cannot be made is left to the timing loop")

    triton_attn._compile_in_parallel([dict(BLOCK_M=m, num_warps=4) for m in (16, 32, 64)], warmup)
    assert not compiled, "nothing compiled in this process while recording"
    assert [[j[2][1] for j in batch] for batch in sent] == [[("value", 16), ("value", 32), ("value", 64)]]


def test_a_real_plan_records_jobs_that_name_its_kernels(triton_kernel):
    """Every argument of the attention kernel's warmup (tensors, the launch tail) can be described, and the job
    names the kernel so that a worker finds it."""
    import importlib

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 72, generator=g) for _ in range(3))
    plan = triton_kernel.make_plan(q, k, v, None, None, None, None, None, 72 ** -0.5, 64)
    with cw.recording() as jobs:
        plan.warmup(q, k, v, None, None, None, None, None, None)
    assert len(jobs) == 1
    module, name, args, grid, options, device = jobs[0]
    assert getattr(importlib.import_module(module), name) is triton_kernel._attn_fwd
    assert options == {"num_warps": plan.config["num_warps"], "num_stages": plan.config["num_stages"]}
    assert device == -1 and len(args) == len(triton_kernel._attn_fwd.arg_names)
    assert args[0] == ("tensor", "float32", q.data_ptr() % 16)
