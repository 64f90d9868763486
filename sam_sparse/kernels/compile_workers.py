"""Compile a tuner's candidate kernels side by side, in worker processes.

Triton's compiler front end holds the GIL, so a thread pool compiles one config at a time in effect, and a
patched model's first call is mostly compile time (docs/benchmarks.md: 10 of hiera_l's 12 s). Here each
warmup call (kernel, arguments, launch options) is described without its data: a tensor by its dtype and
address modulo 16 (all that Triton specializes a pointer on), a TMA descriptor by its base's dtype and its
shape, strides and box, other arguments as they are. Worker processes (``python -m
sam_sparse.kernels.compile_workers``) rebuild such arguments as stand-ins that own no memory and call the
kernel's own ``warmup``: Triton compiles and writes the kernel to its on-disk cache, where the parent's warmup
of the same arguments then finds it. The parent compiles jobs itself too while the workers import torch.

Workers start on the first batch of jobs and exit after IDLE_S seconds without one. SAM_SPARSE_COMPILE_WORKERS
sets their number (0: none; default: up to 8, one per spare CPU core; none on machines with fewer than 4).
A job that fails in a worker is simply left to the parent, which compiles it (and reports its error) when it
launches the config.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import time
from typing import Any, List, Optional, Sequence, Tuple

import torch

IDLE_S = 20.0
_HEADER = struct.Struct("<Q")


# ---------------------------------------------------------------------------------------------------
# Jobs: a warmup call without its data
# ---------------------------------------------------------------------------------------------------


class Stub:
    """A tensor as Triton's specializer sees it: a dtype and an address (only its alignment matters)."""

    def __init__(self, dtype: torch.dtype, address: int):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe(arg: Any) -> tuple:
    """A picklable description of one warmup argument. A tensor keeps only its dtype and address modulo 16."""
    if isinstance(arg, torch.Tensor):
        return ("tensor", _dtype_name(arg.dtype), arg.data_ptr() % 16)
    base = getattr(arg, "base", None)
    if isinstance(base, torch.Tensor) and hasattr(arg, "block_shape"):  # a triton TensorDescriptor
        return ("desc", _dtype_name(base.dtype), base.data_ptr() % 16, list(arg.shape), list(arg.strides),
                list(arg.block_shape), getattr(arg, "padding", "zero"))
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return ("value", arg)
    raise TypeError(f"a warmup argument of type {type(arg).__name__} cannot be sent to a compile worker")


def rebuild(spec: tuple) -> Any:
    """The stand-in of a described argument: a Stub (at address 256 + the original's offset), a
    TensorDescriptor over one, or the value."""
    kind = spec[0]
    if kind == "value":
        return spec[1]
    stub = Stub(getattr(torch, spec[1]), 256 + spec[2])
    if kind == "tensor":
        return stub
    from triton.tools.tensor_descriptor import TensorDescriptor

    _, _, _, shape, strides, block, padding = spec
    return TensorDescriptor(stub, shape, strides, block, **({} if padding == "zero" else {"padding": padding}))


def job(kernel, args: Sequence[Any], grid: Tuple[int, ...], options: dict, device_index: int) -> tuple:
    """(module, kernel name, described args, grid, options, device): one warmup call of a @triton.jit
    kernel defined at module level."""
    fn = kernel.fn
    return (fn.__module__, fn.__name__, [describe(a) for a in args], tuple(grid), dict(options), device_index)


def run_job(spec: tuple) -> None:
    """Compile one job in this process (a worker's side of the protocol, or the parent's own)."""
    module, name, args, grid, options, device_index = spec
    kernel = getattr(importlib.import_module(module), name)
    with torch.cuda.device(device_index) if device_index >= 0 else contextlib.nullcontext():
        kernel.warmup(*[rebuild(a) for a in args], grid=grid, **options)


# ---------------------------------------------------------------------------------------------------
# Recording: warmup calls made inside `recording()` become jobs instead of compiles
# ---------------------------------------------------------------------------------------------------

_RECORD = threading.local()


class recording:
    """Within this block (this thread), warm() collects jobs into the list it returns instead of compiling."""

    def __enter__(self) -> List[tuple]:
        self.jobs: List[tuple] = []
        _RECORD.jobs = self.jobs
        return self.jobs

    def __exit__(self, *exc) -> None:
        _RECORD.jobs = None


def warm(kernel, *args, grid, device: Optional[torch.device] = None, **options) -> None:
    """kernel.warmup(*args, grid=grid, **options), or, inside `recording()`, that call recorded as a job."""
    jobs = getattr(_RECORD, "jobs", None)
    if jobs is None:
        kernel.warmup(*args, grid=grid, **options)
        return
    index = -1 if device is None or device.type != "cuda" else (device.index if device.index is not None else
                                                                torch.cuda.current_device())
    jobs.append(job(kernel, args, grid, options, index))


# ---------------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------------


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream):
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("compile worker closed its pipe")
    return pickle.loads(stream.read(_HEADER.unpack(head)[0]))


def worker_count() -> int:
    """SAM_SPARSE_COMPILE_WORKERS, or up to 8 (one per spare CPU core; none below 4 cores)."""
    env = os.environ.get("SAM_SPARSE_COMPILE_WORKERS")
    if env is not None:
        try:
            return max(0, int(env))
        except ValueError:
            raise ValueError(f"SAM_SPARSE_COMPILE_WORKERS={env!r}: expected a number of worker processes (0: none)") from None
    cores = os.cpu_count() or 1
    return 0 if cores < 4 else min(8, cores - 1)


class _Worker:
    """One worker process; `ready` once it has imported torch and Triton."""

    def __init__(self, env: dict, modules: Sequence[str] = ()):
        self.proc = subprocess.Popen([sys.executable, "-m", __name__, *modules], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.lock = threading.Lock()

    def call(self, spec: tuple) -> Tuple[bool, str]:
        with self.lock:
            _send(self.proc.stdin, spec)
            return _receive(self.proc.stdout)

    def wait_ready(self) -> bool:
        try:
            return _receive(self.proc.stdout) == "ready"
        except (EOFError, OSError, pickle.UnpicklingError):
            return False

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=1)  # a worker busy with a job nobody waits for is killed
        except Exception:
            self.proc.kill()


class CompilePool:
    """Worker processes that compile jobs; the calling thread compiles jobs too while they start."""

    def __init__(self, workers: int, env: Optional[dict] = None):
        self.size = workers
        self._env = env
        self._workers: List[_Worker] = []
        self._ready: List[threading.Event] = []
        self._lock = threading.Lock()
        self._timer: Optional[threading.Timer] = None
        self._started = False
        self.stats = dict(workers=0, here=0, failed=0)  # jobs compiled so far, by where

    def _start(self, modules: Sequence[str] = ()) -> None:
        self._started = True
        env = dict(os.environ if self._env is None else self._env)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["SAM_SPARSE_COMPILE_WORKERS"] = "0"  # a worker never starts workers of its own
        for _ in range(self.size):
            try:
                w = _Worker(env, modules)
            except OSError:
                break
            ready = threading.Event()
            self._workers.append(w)
            self._ready.append(ready)
            threading.Thread(target=lambda w=w, e=ready: w.wait_ready() and e.set(), daemon=True).start()

    def compile(self, jobs: List[tuple], local: bool = True) -> List[Tuple[bool, str]]:
        """Compile every job; returns (ok, message) per job. Workers take jobs from a queue; this thread
        (local=True) takes them too, and once the queue is empty compiles any job a worker has held longer than
        this thread's own last compile took (a worker still starting Triton up), so it never waits idle. A
        worker's late answer to a job done here is dropped."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            alive = [i for i, w in enumerate(self._workers) if w.proc.poll() is None]
            self._workers, self._ready = [self._workers[i] for i in alive], [self._ready[i] for i in alive]
            if not self._started:  # workers that died stay gone until the idle close
                self._start(sorted({j[0] for j in jobs}))
            workers, ready = list(self._workers), list(self._ready)
        todo: "queue.Queue[int]" = queue.Queue()
        for i in range(len(jobs)):
            todo.put(i)
        results: List[Optional[Tuple[bool, str]]] = [None] * len(jobs)
        where = ["failed"] * len(jobs)
        done = [threading.Event() for _ in jobs]
        record = threading.Lock()

        def finish(i: int, result: Tuple[bool, str], who: str) -> None:
            with record:
                if not done[i].is_set():
                    results[i], where[i] = result, who
                    done[i].set()

        def serve(worker: _Worker, ready_event: threading.Event) -> None:
            while not ready_event.wait(0.05):
                if todo.empty() or worker.proc.poll() is not None:
                    return
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    result = worker.call(jobs[i])
                except Exception:  # a dead or garbled worker: dropped, its job back in the queue
                    worker.proc.kill()
                    todo.put(i)
                    return
                finish(i, result, "workers")

        for wr in zip(workers, ready):
            threading.Thread(target=serve, args=wr, daemon=True).start()
        took = 1.0  # seconds: how long a job held by a worker may run before this thread compiles it too
        while True:
            i = None
            if local:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    pass
            if i is None:
                pending = [j for j, e in enumerate(done) if not e.is_set()]
                if not pending:
                    break
                if done[pending[0]].wait(took if local else 0.05):
                    continue
                if not local:
                    local = not any(w.proc.poll() is None for w in workers)  # none left to wait for
                    continue
                i = pending[0]
            t = time.perf_counter()
            finish(i, _run_local(jobs[i]), "here")
            took = time.perf_counter() - t
        for r, w in zip(results, where):
            self.stats[w if r is not None and r[0] else "failed"] += 1
        with self._lock:
            self._timer = threading.Timer(IDLE_S, self.close)
            self._timer.daemon = True
            self._timer.start()
        return [r if r is not None else (False, "not run") for r in results]

    def close(self) -> None:
        with self._lock:
            workers, self._workers, self._ready, self._started = self._workers, [], [], False
        for w in workers:
            w.close()


def _run_local(spec: tuple) -> Tuple[bool, str]:
    try:
        run_job(spec)
        return True, ""
    except Exception as e:
        return False, f"{type(e).__name__}: {e}"


_POOL: Optional[CompilePool] = None
_POOL_LOCK = threading.Lock()


def pool() -> Optional[CompilePool]:
    """This process's pool, or None when workers are off (SAM_SPARSE_COMPILE_WORKERS=0, few CPU cores)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            n = worker_count()
            if n == 0:
                return None
            _POOL = CompilePool(n)
            import atexit

            atexit.register(_POOL.close)
        return _POOL


def _serve() -> None:
    """A worker: import the kernel modules named on the command line and start Triton's driver, report ready,
    then compile jobs from stdin until it closes, answering (ok, message) each."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed goes to stderr, never into the protocol
    try:  # done before "ready": until then the parent compiles alone
        for module in sys.argv[1:]:
            importlib.import_module(module)
        import triton

        triton.runtime.driver.active.get_current_target()
    except Exception:
        pass  # the jobs will say what is wrong
    _send(stdout, "ready")
    while True:
        try:
            spec = _receive(stdin)
        except EOFError:
            return
        _send(stdout, _run_local(spec))


if __name__ == "__main__":
    _serve()
