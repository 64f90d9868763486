"""A function of CUDA tensors replayed from CUDA graphs, one graph per input signature.

A batch-1 image encoder launches hundreds of kernels, and on a fast GPU launching them takes the host
longer than the GPU takes to run them (SAM 2's hiera_l: about 20 ms of wall time per frame on an H200,
for a whole frame's GPU work of 18 ms). A graph replays the same kernels with one launch.

    encoder = GraphedFunction(model.image_encoder, state=functools.partial(module_storage, model.image_encoder))
    features = encoder(x)       # first call per signature: warm-up runs, then capture; later: replay

The signature is what a graph fixes: each argument's shape, strides, dtype and device, the keyword
arguments (hashable non-tensor values the function's work depends on, passed on to it), inference mode,
the CUDA autocast state and float32 matmul precision. `state()`, when given, is what else the graph reads
(e.g. where the model's parameters live: a graph reads them at the addresses it was captured with); when
it changes, every graph is dropped (its memory freed) and the next call captures again. Outputs are
fresh tensors (copies of the graph's, aliases kept), so a caller may keep them across calls. Warm-up and
capture run under the caller's autocast with its weight cache off: a cached cast made outside the capture
would be freed when the caller's autocast block ends, under the graph's feet. Graphs are for inference:
with grad enabled (autograd needs the eager graph) or arguments off CUDA the function runs as is. Module
hooks inside the function run while a graph is captured, not when it replays.

A function that waits for the device (.item(), a copy to the host) is found in its last warm-up call,
before any capture (a capture that fails halfway leaves CUDA's random generator in capture mode for the
whole process); it, or a capture that fails, is recorded in `errors` and that signature runs eagerly
from then on. `capture_after=n` captures a signature only once it has come n + 1 calls in a row (eager
before): signatures that change from call to call (a video's memory while it fills, and again each time
the video is propagated anew) cost no capture; `max_graphs` keeps the most recently used graphs only.
The checked warm-up and the capture happen once per signature, one at a time in the process
(`capture`); while they run, another thread that waits for the device gets an error (CUDA's capture
rules and the sync check are process-wide). A GraphedFunction called inside another's warm-up or capture
(a patched image encoder inside a predictor's graph), or inside a capture of the caller's own, runs its
function: the outer graph records its kernels.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Hashable, Optional

import torch

_CAPTURE_LOCK = threading.RLock()  # one checked warm-up + capture at a time: the sync-debug mode is global
_CAPTURING = threading.local()  # depth of capture() calls on this thread (warm-ups included)


def capturing() -> bool:
    """Whether this thread is inside capture() (a warm-up or the capture): a GraphedFunction called there
    runs its function, so that the outer graph records its kernels, not a replay of a graph of its own."""
    return getattr(_CAPTURING, "depth", 0) > 0


def _map(fn, tree, memo=None):
    """fn applied to every tensor of a nest of dicts, lists and tuples; a tensor met twice maps once."""
    memo = {} if memo is None else memo
    if isinstance(tree, torch.Tensor):
        if id(tree) not in memo:
            memo[id(tree)] = fn(tree)
        return memo[id(tree)]
    if isinstance(tree, dict):
        return {k: _map(fn, v, memo) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v, memo) for v in tree)
    return tree


def capture(fn: Callable, warmup: int = 2):
    """(graph, outputs) of fn() captured as a CUDA graph on the current device, after `warmup` calls on a
    side stream (lazy init, kernel tuning, allocator), the last of them with synchronizing calls turned
    into errors. Raises what the warm-up or the capture raised; the graph is reset then."""
    if warmup < 1:
        raise ValueError(f"warmup={warmup!r}: expected at least 1 (the last warm-up call is checked)")
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    graph = None
    with _CAPTURE_LOCK:
        _CAPTURING.depth = getattr(_CAPTURING, "depth", 0) + 1
        try:
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(warmup - 1):
                    fn()
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = fn()
        except Exception:
            current.wait_stream(side)
            if graph is not None:
                graph.reset()
            raise
        finally:
            _CAPTURING.depth -= 1
    return graph, outputs


class GraphedFunction:
    """fn(*tensors, **static) -> a nest of tensors (dicts, lists, tuples), replayed from a CUDA graph per
    signature.

    fn must do the same device work for the same signature. static: hashable non-tensor arguments (part of
    the signature). warmup: calls before the capture (>= 2 is best: the first one tunes kernels, the last
    one is checked for waits). state: a callable giving what else the graph reads (module_storage of the
    modules fn runs, as functools.partial so that copies and pickles follow their own model). capture_after:
    eager calls in a row with one signature before it is captured. max_graphs: graphs kept (least recently
    used first out), None for all. Thread-safe: one replay at a time, and a replay's inputs are not
    overwritten before the previous replay has consumed them, whatever stream either runs on. Deep copies
    and pickles start with no graphs."""

    def __init__(self, fn: Callable, warmup: int = 2, state: Optional[Callable[[], Hashable]] = None,
                 capture_after: int = 0, max_graphs: Optional[int] = None):
        if capture_after < 0 or (max_graphs is not None and max_graphs < 1):
            raise ValueError(f"capture_after={capture_after!r}, max_graphs={max_graphs!r}: expected capture_after "
                             ">= 0 and max_graphs >= 1 or None")
        self.fn = fn
        self.warmup = warmup
        self.state = state
        self.capture_after = capture_after
        self.max_graphs = max_graphs
        self.errors: dict = {}
        self._graphs: OrderedDict = OrderedDict()  # signature -> (graph, inputs, outputs); least recent first
        self._run = (None, 0)  # (signature, calls in a row with it): capture_after
        self._state = None  # the state() every graph in _graphs was captured with
        self._lock = threading.Lock()
        self._done: Optional[torch.cuda.Event] = None  # recorded after the last replay's outputs were copied

    def __getstate__(self):
        return {"fn": self.fn, "warmup": self.warmup, "state": self.state, "capture_after": self.capture_after,
                "max_graphs": self.max_graphs}

    def __setstate__(self, state):
        self.__init__(state["fn"], state["warmup"], state["state"], state.get("capture_after", 0),
                      state.get("max_graphs"))

    def __call__(self, *args, **static):
        if (not args or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args) or torch.is_grad_enabled()
                or capturing() or torch.cuda.is_current_stream_capturing()):
            return self.fn(*args, **static)
        key = self._signature(args, static)
        state = self.state() if self.state is not None else None
        with self._lock:
            if state != self._state:  # every graph reads what has moved: all go, with their memory
                self._drop(list(self._graphs))
                self._state = state
            last, run = self._run
            self._run = (key, run + 1 if key == last else 1)
            if key in self.errors:
                entry = None
            elif key in self._graphs:
                entry = self._graphs[key]
                self._graphs.move_to_end(key)
            elif self._run[1] <= self.capture_after:
                entry = None
            else:
                entry = self._capture(args, static, key)
                if entry is not None:
                    self._graphs[key] = entry
                    if self.max_graphs is not None and len(self._graphs) > self.max_graphs:
                        self._drop([next(iter(self._graphs))])
            if entry is not None:
                graph, inputs, outputs = entry
                with torch.cuda.device(args[0].device):
                    current = torch.cuda.current_stream()
                    if self._done is not None:
                        current.wait_event(self._done)
                    for dst, src in zip(inputs, args):
                        dst.copy_(src)
                    graph.replay()
                    result = _map(torch.clone, outputs)
                    self._done = torch.cuda.Event()
                    self._done.record(current)
                return result
        return self.fn(*args, **static)

    def clear(self) -> None:
        """Let every graph go, with its memory, once the last replay is done with it."""
        with self._lock:
            self._drop(list(self._graphs))

    def _drop(self, keys) -> None:
        """Forget these graphs, their memory with them, once the last replay is done with it."""
        if keys and self._done is not None:
            self._done.synchronize()
        for key in keys:
            self._graphs.pop(key)[0].reset()

    @property
    def graphs(self) -> int:
        """How many signatures have a graph."""
        return len(self._graphs)

    @property
    def signatures(self) -> list:
        """The signatures that have a graph, least recently used first: (argument (shape, strides, dtype,
        device)s, sorted static arguments, then the modes)."""
        return list(self._graphs)

    @staticmethod
    def _signature(args, static) -> tuple:
        on = torch.is_autocast_enabled("cuda")
        shapes = tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in args)
        return (shapes, tuple(sorted(static.items())), torch.is_inference_mode_enabled(), on,
                torch.get_autocast_dtype("cuda") if on else None, torch.get_float32_matmul_precision(),
                torch.backends.cudnn.allow_tf32)

    def _capture(self, args, static, key):
        on = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        try:
            with torch.cuda.device(args[0].device):
                inputs = [a.clone() for a in args]

                def step():
                    with torch.autocast("cuda", dtype=dtype, enabled=on, cache_enabled=False):
                        return self.fn(*inputs, **static)

                graph, outputs = capture(step, self.warmup)
        except Exception as e:  # noqa: BLE001  this signature runs eagerly; the reason is kept
            self.errors[key] = f"{type(e).__name__}: {e}"
            return None
        return graph, inputs, outputs


def module_storage(*modules: torch.nn.Module) -> tuple:
    """Where the modules' parameters and buffers live, with their shapes and dtypes: what a graph of them
    reads (a GraphedFunction's `state` for models that may be moved, recast or given new weights)."""
    return tuple((t.data_ptr(), t.shape, t.dtype) for m in modules for t in (*m.parameters(), *m.buffers()))
