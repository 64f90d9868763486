"""What the memory attention of a patched video model needs from the current call, per thread, and the
block layouts of its memory cross-attention. Family-free: the model side that records a call lives in the
family's patch module (sam2_video.py for SAM 2).

A memory cross-attention call's keys are each batch row's memory: its frames, conditioning frames first,
then object-pointer tokens (geometry.MemoryLayout). How many frames and pointer tokens a row has follows
from the call's shapes; which of its frames are conditioning frames does not, so the code that builds the
memory records it here (MemoryCall) for the duration of the call. When the rows' memories differ in
length the caller packs them one after the other (PackedKeys) and the attention runs through the kernel's
varlen path.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch

from ..geometry import Grid, LayerGeometry, MemoryLayout
from ..kernels import BlockLayout

_MAX_CACHED = 512  # stacked per-call layouts kept per layer (one per distinct batch of memory structures)


@dataclass(frozen=True, eq=False)
class PackedKeys:
    """The memories of a batch of rows packed along the key axis, row after row (varlen).

    layouts: one MemoryLayout per row. cu_seqlens_q / cu_seqlens_k: int32 (rows + 1,) cumulative query /
    key counts; rope_rows: int32 (packed keys,) each key's row of the rotary table: n % frame tokens for the
    n-th frame token of its row, -1 for pointer tokens (rotary encoding leaves them out, as SAM 2 does).
    """

    layouts: Tuple[MemoryLayout, ...]
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    rope_rows: torch.Tensor
    max_seqlen_k: int

    @classmethod
    def build(cls, layouts: Sequence[MemoryLayout], device) -> "PackedKeys":
        """From the rows' layouts (their queries: one frame grid each). One host-to-device copy per tensor."""
        layouts = tuple(layouts)
        lengths = [m.seqlen for m in layouts]
        nq = layouts[0].frame_tokens
        cu_k = [0]
        rope = []
        for m, n in zip(layouts, lengths):
            frame_keys = len(m.frames) * m.frame_tokens
            rope += [torch.arange(frame_keys, dtype=torch.int32) % m.frame_tokens,
                     torch.full((n - frame_keys,), -1, dtype=torch.int32)]
            cu_k.append(cu_k[-1] + n)
        as_int32 = lambda v: torch.tensor(v, dtype=torch.int32).to(device, non_blocking=True)  # noqa: E731
        return cls(layouts, as_int32([i * nq for i in range(len(layouts) + 1)]), as_int32(cu_k),
                   torch.cat(rope).to(device, non_blocking=True), max(lengths))


@dataclass(frozen=True)
class MemoryCall:
    """One memory-attention call: cond_frames[b] conditioning frames at the front of row b's memory; packed
    when the rows' memories are packed (varlen), None when they are batched as (rows, keys)."""

    cond_frames: Tuple[int, ...]
    packed: Optional[PackedKeys] = None


class MemoryContext:
    """The current memory call of one patched model, per thread; whether its video predictor runs every
    object of a frame as one batch (batch_objects), replays each frame's image encoder from a CUDA graph
    (graph_encoder; the graphs live in `encoder_graph`, made by the model on its first frame, and for an image
    model's encoder under torch.compile in `compiled_encoder_graph`: sam2_encoder.py) and replays a
    batch's memory attention, mask decoder and memory encoder from one (graph_heads; in `heads_graph`), and
    whether an image encoder's first call of an input signature compiles its kernels ahead (compile_ahead; the
    signatures done in `compiled_ahead`: sam2_encoder.py).
    Pickles and deep-copies with the switches only: no per-call state, no graphs."""

    def __init__(self, batch_objects: bool = True, graph_encoder: bool = True, graph_heads: bool = True,
                 compile_ahead: bool = True):
        self.batch_objects = batch_objects
        self.graph_encoder = graph_encoder
        self.graph_heads = graph_heads
        self.compile_ahead = compile_ahead
        self.compiled_ahead = {}  # input signature -> whether its first call's compile-ahead pass ran
        self.encoder_graph = None
        self.compiled_encoder_graph = None
        self.heads_graph = None
        self._local = threading.local()

    def __getstate__(self):
        return {"batch_objects": self.batch_objects, "graph_encoder": self.graph_encoder,
                "graph_heads": self.graph_heads, "compile_ahead": self.compile_ahead}

    def __setstate__(self, state):
        self.__init__(state["batch_objects"], state.get("graph_encoder", True), state.get("graph_heads", True),
                      state.get("compile_ahead", True))

    def drop_graphs(self) -> None:
        """Let the graphs go (their memory with them, once their last replay is done): the patch they replay
        is being undone."""
        for graph in (self.encoder_graph, self.compiled_encoder_graph, self.heads_graph):
            if graph is not None:
                graph.clear()
        self.encoder_graph = self.compiled_encoder_graph = self.heads_graph = None

    @property
    def current(self) -> Optional[MemoryCall]:
        return getattr(self._local, "call", None)

    @contextlib.contextmanager
    def call(self, call: MemoryCall):
        """Inside the block, memory attention calls on this thread see `call`."""
        previous = self.current
        self._local.call = call
        try:
            yield call
        finally:
            self._local.call = previous


def row_layouts(call: Optional[MemoryCall], batch: int, seqlen_q: int, seqlen_k: int, pointer_tokens: int,
                grid: Grid) -> Tuple[MemoryLayout, ...]:
    """Each batch row's MemoryLayout for a call batched as (rows, keys): frames from the shapes, conditioning
    frames from the recorded call. Without a record (a bare call of the module), every frame counts as a
    conditioning frame: a policy then keeps what it keeps for prompted frames (dense by default)."""
    frames, rest = (seqlen_k - pointer_tokens) // seqlen_q, (seqlen_k - pointer_tokens) % seqlen_q  # not divmod: dynamo's SymInts
    if rest or frames < 0:
        raise ValueError(f"memory cross-attention: {seqlen_k} keys with {pointer_tokens} pointer tokens are not whole "
                         f"frames of {seqlen_q} tokens")
    conds = call.cond_frames if call is not None and len(call.cond_frames) == batch else (frames,) * batch
    return tuple(MemoryLayout((True,) * min(c, frames) + (False,) * (frames - min(c, frames)), grid, pointer_tokens)
                 for c in conds)


def memory_geometry(template: LayerGeometry, memory: MemoryLayout) -> LayerGeometry:
    """A memory.cross template's geometry for one row's memory."""
    return replace(template, seqlen_q=memory.frame_tokens, seqlen_k=memory.seqlen, q_grid=memory.grid, k_grid=None,
                   memory=memory)


def memory_block_layout(state, layouts: Tuple[MemoryLayout, ...], varlen: bool,
                        device: torch.device) -> Optional[BlockLayout]:
    """The BlockLayout of a memory cross-attention call (None: dense), cached per distinct call in
    state.layouts. layouts: one per row. Batched rows share one mask when their layouts are equal, else get
    (rows, heads, QB, KB); varlen rows get (rows, heads, QB, max KB), each padded with False past its keys."""
    key = ("memory", layouts, varlen, device)
    compiling = torch.compiler.is_compiling()  # traced: built in the graph, kept nowhere (LayerState)
    if not compiling and key in state.layouts:
        return state.layouts[key]
    distinct = list(dict.fromkeys(layouts))
    masks = {m: state.policy.block_mask(memory_geometry(state.geometry, m), None, device) for m in distinct}
    if all(mask is None for mask in masks.values()):
        result = None
    else:
        bs = state.block_size
        rows = distinct if (len(distinct) == 1 and not varlen) else list(layouts)
        qb = -(-rows[0].frame_tokens // bs)
        kb = max(-(-m.seqlen // bs) for m in rows)
        heads = max(1 if masks[m] is None else masks[m].shape[1] for m in rows)
        full = torch.zeros(len(rows), heads, qb, kb, dtype=torch.bool, device=device)
        for i, m in enumerate(rows):
            n = -(-m.seqlen // bs)
            full[i, :, :, :n] = True if masks[m] is None else masks[m][0]
        result = BlockLayout.from_mask(full, bs)
    if compiling:
        return result
    if len(state.layouts) >= _MAX_CACHED:
        for k in [k for k in state.layouts if k[0] == "memory"]:
            del state.layouts[k]
        state.dropped += 1
    state.layouts[key] = result
    return result
