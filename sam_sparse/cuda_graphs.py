"""A function of CUDA tensors replayed from CUDA graphs, one graph per input signature.

A batch-1 image encoder launches hundreds of kernels, and on a fast GPU launching them takes the host
longer than the GPU takes to run them (SAM 2's hiera_l: about 20 ms of wall time per frame on an H200,
for a whole frame's GPU work of 18 ms). A graph replays the same kernels with one launch.

    encoder = GraphedFunction(model.image_encoder, state=lambda: module_storage(model.image_encoder))
    features = encoder(x)       # first call per signature: warm-up runs, then capture; later: replay

The signature is what a graph fixes: each argument's shape, strides, dtype and device, inference mode,
the CUDA autocast state, and `state()` when given (e.g. where the model's parameters live: a graph reads
them at the addresses it was captured with). A call with another signature gets its own graph. Outputs
are fresh tensors (copies of the graph's), so a caller may keep them across calls. Warm-up and capture
run under the caller's autocast with its weight cache off: a cached cast made outside the capture would
be freed when the caller's autocast block ends, under the graph's feet. Graphs are for inference: with
grad enabled (autograd needs the eager graph) or arguments off CUDA the function runs as is. A function
that waits for the device (.item(), a copy to the host) is found in its last warm-up call, before any
capture; it, or a capture that fails, is recorded in `errors` and that signature runs eagerly from then on.
That last warm-up call and the capture happen once per signature; while they run, another thread of the
process that waits for the device gets an error (CUDA's capture rules and the sync check are process-wide).
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, Optional

import torch


def _map(fn, tree):
    """fn applied to every tensor of a nest of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v) for v in tree)
    return tree


class GraphedFunction:
    """fn(*tensors) -> a nest of tensors (dicts, lists, tuples), replayed from a CUDA graph per signature.

    fn must do the same device work for the same signature and never wait for the device. Thread-safe
    (one replay at a time). Deep copies and pickles start with no graphs."""

    def __init__(self, fn: Callable, warmup: int = 2, state: Optional[Callable[[], Hashable]] = None):
        self.fn = fn
        self.warmup = warmup
        self.state = state
        self.errors: dict = {}
        self._graphs: dict = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {"fn": self.fn, "warmup": self.warmup, "state": self.state}

    def __setstate__(self, state):
        self.__init__(state["fn"], state["warmup"], state["state"])

    def __deepcopy__(self, memo):
        import copy

        return GraphedFunction(copy.deepcopy(self.fn, memo), self.warmup, copy.deepcopy(self.state, memo))

    def __call__(self, *args):
        if not args or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args) or torch.is_grad_enabled():
            return self.fn(*args)
        key = self._signature(args)
        with self._lock:
            if key not in self._graphs:
                self._graphs[key] = self._capture(args, key)
            entry = self._graphs[key]
            if entry is None:
                return self.fn(*args)
            graph, inputs, outputs = entry
            for dst, src in zip(inputs, args):
                dst.copy_(src)
            graph.replay()
            return _map(torch.clone, outputs)

    @property
    def graphs(self) -> int:
        """How many signatures have a graph."""
        return sum(e is not None for e in self._graphs.values())

    def _signature(self, args) -> tuple:
        on = torch.is_autocast_enabled("cuda")
        return (tuple((tuple(a.shape), a.stride(), a.dtype, a.device) for a in args), torch.is_inference_mode_enabled(), on, torch.get_autocast_dtype("cuda") if on else None,
                self.state() if self.state is not None else None)

    def _capture(self, args, key):
        device = args[0].device
        inputs = [torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device=device).copy_(a) for a in args]
        on = torch.is_autocast_enabled("cuda")
        autocast = lambda: torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=on,  # noqa: E731
                                          cache_enabled=False)
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        graph = None
        try:
            side.wait_stream(current)
            with torch.cuda.stream(side), autocast():  # lazy init, kernel tuning, allocator: off the capture
                for _ in range(max(1, self.warmup - 1)):
                    self.fn(*inputs)
                # A function that waits for the device cannot be captured, and a capture that fails halfway
                # leaves CUDA's random generator in capture mode for the whole process: so the last warm-up
                # call runs with synchronizing calls turned into errors (process-wide, for this one call).
                previous = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    self.fn(*inputs)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), autocast():
                outputs = self.fn(*inputs)
        except Exception as e:  # noqa: BLE001  this signature runs eagerly; the reason is kept
            self.errors[key] = f"{type(e).__name__}: {e}"
            current.wait_stream(side)
            if graph is not None:
                graph.reset()
            return None
        return graph, inputs, outputs


def module_storage(module: torch.nn.Module) -> tuple:
    """Where a module's parameters and buffers live, and their dtypes: what a graph of it reads (a
    GraphedFunction's `state` for a model that may be moved, recast or given new weights)."""
    return tuple((t.data_ptr(), t.dtype) for t in (*module.parameters(), *module.buffers()))
