"""Block-sparse attention: the functional API, input checks, dispatch and the torch custom ops.

Argument names follow flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func``.

Dispatch: CUDA tensors run the Triton kernel (triton_attn.py). CPU tensors run the PyTorch reference
(reference.py), unless SAM_SPARSE_FORCE_TRITON=1 is set together with TRITON_INTERPRET=1 (set both
before this package launches its first kernel): then CPU tensors go through the same Triton kernel
in Triton's interpreter, which is how CI tests the kernel itself without a GPU.

Plan once, launch many: the first call with a new input signature (shapes, strides, dtypes, devices,
alignment, mask layout shape, rel-pos shapes, key_tile, scale, block size) validates everything and
resolves a plan (triton_attn.KernelPlan: tuned config, grid, scalars, compiled kernel); later calls
with the same signature do one dict lookup and launch. The signature holds no tensor identity, so a
new mask of the same shape reuses the plan and an edited mask is always read afresh.

Varlen calls are keyed without their lengths: not the total lengths, and max_seqlen_k only by its
length_bucket (the next power of two), so the changing lengths of a video's object memories (each call a
new mix as memories fill) find one plan per bucket, with no host sync on the way: cu_seqlens stay on the
device, and their values are checked (a device-to-host copy) only when a call makes a new plan.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import operator
import os
import threading
from typing import Iterator, Optional, Tuple, Union

import torch

from .layout import BlockLayout, check_block_size, length_bucket, mask_from_lists
from .reference import attention_reference, attention_reference_varlen, attention_reference_window

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# 16, 24, ..., 256: SAM's 64 / 80 and 16 / 32 (decoders), Hiera's 96 / 56 / 72, SAM 2's memory 256.
HEAD_DIMS = tuple(range(16, 257, 8))
HEAD_DIMS_ACCEPTED = "multiples of 8 from 16 to 256"
DEFAULT_BLOCK_SIZE = 128


def describe_tensor(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


# Platforms without a Triton wheel (macOS, Windows, aarch64 CPUs) run everything on the reference path.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return os.environ.get("SAM_SPARSE_FORCE_TRITON") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def block_lists(block_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kv_num_blocks, kv_indices) of a bool block mask: BlockLayout.from_mask's two tensors."""
    layout = BlockLayout.from_mask(block_mask, DEFAULT_BLOCK_SIZE)
    return layout.kv_num_blocks, layout.kv_indices


# ---------------------------------------------------------------------------------------------------
# Checks. Every bad input raises ValueError naming the argument, what it was and what is accepted.
# ---------------------------------------------------------------------------------------------------


def _check_no_grad(*tensors) -> None:
    """The kernel has no backward: refuse inputs that want a gradient instead of silently cutting it."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            "sam_sparse's attention is inference-only (no backward pass), but an input requires grad with grad mode "
            "on; run it under torch.no_grad() or torch.inference_mode(), or restore the "
            "original attention (handle.restore()) to train"
        )


def _check_qkv(q, k, v, varlen: bool, grid: bool = False, same_grid: bool = True):
    ndim, layout = (3, "(total, nheads, headdim)") if varlen else (4, "(batch, seqlen, nheads, headdim)")
    if grid:
        ndim, layout = 5, "(batch, grid_h, grid_w, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} has {describe_tensor(t)}; expected {ndim}-D {layout}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has {describe_tensor(t)}; supported dtypes are float16, bfloat16 and float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all tensors must share one device")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
    if grid and k.shape != v.shape:
        raise ValueError(f"k has {describe_tensor(k)} and v has {describe_tensor(v)}; k and v must have the same shape")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k has {describe_tensor(k)} and v has {describe_tensor(v)}; k and v must have the same shape "
                         "but for the head dim")
    if v.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"v's headdim {v.shape[-1]} (v: {describe_tensor(v)}) is not supported; supported: "
                         f"{HEAD_DIMS_ACCEPTED}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]} (q: {describe_tensor(q)}, k: {describe_tensor(k)})")
    if grid and same_grid and k.shape[1:3] != q.shape[1:3]:
        raise ValueError(f"k has the token grid {tuple(k.shape[1:3])} but q has {tuple(q.shape[1:3])}; they must match "
                         "(or give q_window_size for queries on a grid of their own)")
    check_heads(q, k)


def check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    """ValueError unless q's heads (dim -2) are a multiple of k's and both have one supported head dim."""
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hk == 0 or hq % hk:
        raise ValueError(f"q has {hq} heads and k has {hk}; nheads must be a multiple of nheads_k (MQA/GQA)")
    if k.shape[-1] != d:
        raise ValueError(f"k has headdim {k.shape[-1]} but q has {d}; they must match")
    if d not in HEAD_DIMS:
        raise ValueError(f"headdim {d} (q: {describe_tensor(q)}) is not supported; supported: {HEAD_DIMS_ACCEPTED}")


def check_scale(softmax_scale, headdim: int) -> float:
    if softmax_scale is None:
        return headdim**-0.5
    expected = f"softmax_scale={softmax_scale!r}: expected a finite number > 0, or None (headdim ** -0.5)"
    if isinstance(softmax_scale, (str, bytes, bool)):  # float() would take "0.5" and True
        raise ValueError(expected)
    try:
        scale = float(softmax_scale)
    except (TypeError, ValueError):
        raise ValueError(expected) from None
    # > 0: the kernel takes row maxima before scaling (one FMA per score instead of a multiply and an add).
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(expected)
    return scale


def _to_layout(block_mask, block_size, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, device) -> Tuple[Optional[BlockLayout], int]:
    """(layout or None, block size) from a BlockLayout, a bool mask or None, checked against the shapes."""
    if isinstance(block_mask, BlockLayout):
        if block_size is not None and block_size != block_mask.block_size:
            raise ValueError(f"block_size={block_size!r} but the BlockLayout was built with block_size={block_mask.block_size}; "
                             "leave block_size out when passing a BlockLayout")
        bs = check_block_size(block_mask.block_size)
    else:
        bs = check_block_size(DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    if block_mask is None:
        return None, bs
    qb, kb = -(-seqlen_q // bs), -(-seqlen_k // bs)
    want = f"({batch} or 1, {nheads} or 1, {qb}, {kb}) for block_size={bs}"
    if isinstance(block_mask, BlockLayout):
        num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
        for name, t in (("kv_num_blocks", num), ("kv_indices", idx)):
            if t.dtype != torch.int32 or t.device != device:
                raise ValueError(f"BlockLayout.{name} has {describe_tensor(t)}; expected int32 on {device}")
        s = idx.shape
        if idx.dim() != 4 or tuple(num.shape) != tuple(s[:3]) or idx.stride(-1) != 1:
            raise ValueError(f"BlockLayout has kv_num_blocks {tuple(num.shape)} and kv_indices {tuple(s)} "
                             f"(last stride {idx.stride(-1)}); build it with BlockLayout.from_mask")
        layout, what = block_mask, f"BlockLayout with shape {tuple(s)}"
    else:
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            got = describe_tensor(block_mask) if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise ValueError(f"block_mask has {got}; expected a BlockLayout or a bool tensor {want}")
        if block_mask.device != device:
            raise ValueError(f"block_mask is on {block_mask.device} but q is on {device}")
        s = block_mask.shape
        layout, what = None, f"block_mask with shape {tuple(s)}"
    if len(s) != 4 or s[0] not in (1, batch) or s[1] not in (1, nheads) or s[2] != qb or s[3] != kb:
        raise ValueError(f"{what}; expected {want}")
    return (layout if layout is not None else BlockLayout.from_mask(block_mask, bs)), bs


def check_rel(rel_h, rel_w, key_tile, q, seqlen_k: int, dtypes=SUPPORTED_DTYPES):
    """The decomposed rel-pos terms and key order: ValueError unless rel_h (B, H, Nq, kh) and rel_w
    (B, H, Nq, kw) come together, match q (batch, seqlen_q, nheads), have a dtype in `dtypes`, sit on q's
    device and kh * kw == seqlen_k, and key_tile (only with them) splits the kh x kw grid into whole
    tiles. Returns key_tile as a pair of ints, or None."""
    if rel_h is None and rel_w is None:
        if key_tile is not None:
            raise ValueError("key_tile describes the key order for rel_h / rel_w; pass it only with them")
        return None
    if rel_h is None or rel_w is None:
        raise ValueError("rel_h and rel_w go together: pass both or neither")
    batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[:3]) != (batch, nheads, seqlen_q):
            got = describe_tensor(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} has {got}; expected ({batch}, {nheads}, {seqlen_q}, k{name[-1]}) = (batch, nheads, seqlen_q, grid size)")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise ValueError(f"{name} has {describe_tensor(t)}; supported dtypes are {names}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    if kh * kw != seqlen_k:
        raise ValueError(f"rel_h has kh={kh} and rel_w has kw={kw}, but kh * kw = {kh * kw} != seqlen_k = {seqlen_k}")
    if key_tile is None:
        return None
    try:
        th, tw = (operator.index(x) for x in key_tile)
    except (TypeError, ValueError):
        raise ValueError(f"key_tile={key_tile!r}: expected a pair (th, tw) of positive ints") from None
    if th <= 0 or tw <= 0 or kh % th or kw % tw:
        raise ValueError(f"key_tile={key_tile!r} must divide the key grid ({kh}, {kw}) into whole tiles")
    return (th, tw)


def _check_cu_seqlens(name, cu, total: int, device):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        got = describe_tensor(cu) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} has {got}; expected a 1-D int32 tensor (num_seqs + 1,) of cumulative lengths")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if torch.compiler.is_compiling():
        return
    vals = cu.tolist()
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])) or vals[-1] != total:
        raise ValueError(f"{name}={vals[:8]}{'...' if len(vals) > 8 else ''}: must start at 0, never decrease and end at {total} (the total length)")


def _check_window(window_size, grid, name: str = "window_size") -> Tuple[int, int]:
    """window_size as (wh, ww) positive ints, or ValueError; also refuses an empty token grid."""
    try:
        wh, ww = (operator.index(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={window_size!r}: expected a pair (wh, ww) of positive ints") from None
    if wh <= 0 or ww <= 0:
        raise ValueError(f"{name}={window_size!r}: expected a pair (wh, ww) of positive ints")
    if grid[0] == 0 or grid[1] == 0:
        raise ValueError(f"the token grid {tuple(grid)} is empty; window_attn needs at least one token")
    return wh, ww


def _check_pad(name: str, t, k: torch.Tensor) -> torch.Tensor:
    """A padding key / value vector (nheads_k, headdim) in k's dtype, contiguous (zeros for None)."""
    want = f"(nheads_k, headdim) = {tuple(k.shape[-2:])}"
    if t is None:
        return k.new_zeros(k.shape[-2:])
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(k.shape[-2:]) or not t.is_floating_point():
        got = describe_tensor(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} has {got}; expected a float tensor {want} or None (zeros)")
    if t.device != k.device:
        raise ValueError(f"{name} is on {t.device} but k is on {k.device}")
    return t.to(k.dtype).contiguous()  # (nheads_k, headdim): a few hundred bytes


# ---------------------------------------------------------------------------------------------------
# Plans: one per input signature, so a repeated call skips validation and the tuner.
# ---------------------------------------------------------------------------------------------------

_PLANS: dict = {}
_MAX_PLANS = 4096  # varlen batches of ever-new lengths would otherwise grow it without bound


def _sig(t: Optional[torch.Tensor]):
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.get_device(), t.data_ptr() % 16 == 0)


class _ReferencePlan:
    """The reference path behind the same call signature as triton_attn.KernelPlan."""

    def __init__(self, key_tile, softmax_scale: float, block_size: int, window=None, q_window=None):
        self.key_tile, self.scale, self.block_size = key_tile, softmax_scale, block_size
        self.window, self.q_window = window, q_window

    def __call__(self, q, k, v, kv_num, kv_idx, rel_h, rel_w, cu_q, cu_k, k_pad=None, v_pad=None):
        mask = mask_from_lists(kv_num, kv_idx) if kv_num is not None else None
        if self.window is not None:
            return attention_reference_window(q, k, v, self.window, k_pad, v_pad, mask, rel_h, rel_w, self.scale,
                                              self.block_size, self.q_window)
        if cu_q is not None:
            return attention_reference_varlen(q, k, v, cu_q, cu_k, mask, self.scale, self.block_size)
        return attention_reference(q, k, v, mask, rel_h, rel_w, self.key_tile, self.scale, self.block_size)


def _new_plan(q, k, v, num, idx, rel_h, rel_w, tile, scale, bs, cu_q=None, cu_k=None, max_seqlen_q=None,
              max_seqlen_k=None, window=None, q_window=None, ahead=False):
    if use_triton(q):
        from .triton_attn import make_plan

        return make_plan(q, k, v, num, idx, rel_h, rel_w, tile, scale, bs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, window=window, q_window=q_window,
                         ahead=ahead)
    return _ReferencePlan(tile, scale, bs, window, q_window)


_AHEAD = threading.local()  # .device: the device of the compile_ahead block open on this thread


@contextlib.contextmanager
def compile_ahead(device) -> Iterator[bool]:
    """Compile the kernels of many calls together, before the calls that need them.

    Inside the block (on this thread), a call of block_sparse_attn, block_sparse_attn_varlen or window_attn on
    `device` that would make a new plan checks its inputs, hands the compiles of its kernels to a thread pool and
    returns an uninitialized output of the right shape and dtype without launching anything. What compiles is
    what the real call will launch: its class's tuned config where this process or the disk cache knows it, else
    every candidate config, for the tuner to time on the real call. Calls whose plan exists, and calls on another
    device, run as usual. On exit every compile has finished. So one pass of a model's forward inside the block,
    on a real input, followed by the real forward, compiles each layer's kernels in parallel rather than one layer
    after another at its first launch. The pass's outputs are meaningless: nothing may be kept from it.

    Yields True when the block does that; False, changing nothing, where no kernel compiles (a CPU device,
    Triton's interpreter, no Triton, a Triton without async compiles) or when a compile_ahead block is already
    open on this thread (its pass covers this one): then a caller skips its pass.
    """
    device = torch.device(device)
    if (device.type != "cuda" or not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1"
            or getattr(_AHEAD, "device", None) is not None):
        yield False
        return
    from .triton_attn import parallel_compiles

    with parallel_compiles() as parallel:
        _AHEAD.device = device if parallel else None
        try:
            yield parallel
        finally:
            _AHEAD.device = None


def _ahead(q: torch.Tensor) -> bool:
    """Whether this call only compiles: inside compile_ahead, on its device."""
    device = getattr(_AHEAD, "device", None)
    return device is not None and q.device.type == device.type and device.index in (None, q.device.index)


def _planned(key, make):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = make()
    return plan


def _fast_key(q, k, v, layout, rel_h, rel_w, key_tile, softmax_scale, block_size):
    num = idx = None
    if layout is not None:
        num, idx = layout.kv_num_blocks, layout.kv_indices
    return (
        _sig(q), _sig(k), _sig(v), _sig(num), _sig(idx), _sig(rel_h), _sig(rel_w),
        None if key_tile is None else tuple(key_tile), softmax_scale, block_size,
        None if layout is None else layout.block_size,
        True if q.is_cuda else use_triton(q), torch.get_float32_matmul_precision(),
    )


def _rows_sig(t: torch.Tensor):
    """_sig without the leading (total length) dim: what a varlen plan depends on."""
    return (t.shape[1:], t.stride(), t.dtype, t.get_device(), t.data_ptr() % 16 == 0)


def _varlen_key(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, num, idx, layout_bs, softmax_scale, block_size):
    """A varlen call's plan key: no total length, max_seqlen_k by its length_bucket only. With a mask, the
    number of blocks max_seqlen_q / max_seqlen_k need is in the key, so that a hit is a call whose mask
    covers its lengths, as the first call's did when it was checked."""
    blocks = None
    if layout_bs is not None:
        blocks = (-(-max_seqlen_q // layout_bs), -(-max_seqlen_k // layout_bs))
    return ("varlen", _rows_sig(q), _rows_sig(k), _rows_sig(v), _sig(cu_q), _sig(cu_k), max_seqlen_q,
            length_bucket(max_seqlen_k), _sig(num), _sig(idx), blocks, softmax_scale, block_size,
            True if q.is_cuda else use_triton(q), torch.get_float32_matmul_precision())


def _is_length(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


# ---------------------------------------------------------------------------------------------------
# Custom ops: one opaque node each under torch.compile, with fake implementations for tracing.
# ---------------------------------------------------------------------------------------------------

_LIB = torch.library.Library("sam_sparse", "FRAGMENT")


def _define_op(name: str, impl, fake) -> torch._ops.OpOverload:
    """sam_sparse::name: the schema from impl's annotations, impl for every device, fake for tracing.

    Defined on a Library directly rather than through torch.library.custom_op: its Python autograd and
    dispatch layers cost each call a compiled graph makes 3-25 us more (docs/benchmarks.md, run 77: at
    hiera_l's 16 x 16 windows 33 against 37 us under inference_mode, 38 against 50 under no_grad). The ops
    are forward only, and the public functions refuse grad before they reach them."""
    _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()))
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"sam_sparse::{name}", fake, lib=_LIB)
    return getattr(torch.ops.sam_sparse, name).default


def _attn_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: Optional[torch.Tensor],
    kv_indices: Optional[torch.Tensor],
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
    key_tile: Optional[list[int]],
    softmax_scale: float,
    block_size: int,
) -> torch.Tensor:
    tile = tuple(key_tile) if key_tile is not None else None
    key = ("op", _sig(q), _sig(k), _sig(v), _sig(kv_num_blocks), _sig(kv_indices), _sig(rel_h), _sig(rel_w), tile,
           softmax_scale, block_size, use_triton(q), torch.get_float32_matmul_precision())
    plan = _planned(key, lambda: _new_plan(q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, tile, softmax_scale, block_size))
    return plan(q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, None, None)


def _like_q(q, *args):
    return q.new_empty(q.shape)


def _like_qv(q, k, v, *args):
    """q's shape with v's head dim: the output of block_sparse_attn(_varlen)."""
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


_attn_op = _define_op("block_sparse_attn", _attn_impl, _like_qv)


def _attn_varlen_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    kv_num_blocks: Optional[torch.Tensor],
    kv_indices: Optional[torch.Tensor],
    softmax_scale: float,
    block_size: int,
) -> torch.Tensor:
    key = ("op",) + _varlen_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, kv_num_blocks,
                                kv_indices, None if kv_num_blocks is None else block_size, softmax_scale, block_size)
    plan = _planned(key, lambda: _new_plan(q, k, v, kv_num_blocks, kv_indices, None, None, None, softmax_scale,
                                           block_size, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return plan(q, k, v, kv_num_blocks, kv_indices, None, None, cu_seqlens_q, cu_seqlens_k)


_attn_varlen_op = _define_op("block_sparse_attn_varlen", _attn_varlen_impl, _like_qv)


def _window_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_pad: torch.Tensor,
    v_pad: torch.Tensor,
    kv_num_blocks: Optional[torch.Tensor],
    kv_indices: Optional[torch.Tensor],
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
    window_size: list[int],
    q_window_size: list[int],
    softmax_scale: float,
    block_size: int,
) -> torch.Tensor:
    plan = _window_plan(q, k, v, k_pad, v_pad, kv_num_blocks, kv_indices, rel_h, rel_w, window_size, q_window_size,
                        softmax_scale, block_size)
    return plan(q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, None, None, k_pad, v_pad)


def _window_plan(q, k, v, k_pad, v_pad, kv_num_blocks, kv_indices, rel_h, rel_w, window_size, q_window_size,
                 softmax_scale, block_size):
    """The plan of a checked window_attn call, from the plan cache (keyed by every input's signature)."""
    win, q_win = tuple(window_size), tuple(q_window_size)
    key = ("window", _sig(q), _sig(k), _sig(v), _sig(k_pad), _sig(v_pad), _sig(kv_num_blocks), _sig(kv_indices),
           _sig(rel_h), _sig(rel_w), win, q_win, softmax_scale, block_size, use_triton(q),
           torch.get_float32_matmul_precision())
    return _planned(key, lambda: _new_plan(q, k, v, kv_num_blocks, kv_indices, rel_h, rel_w, None, softmax_scale,
                                           block_size, window=win, q_window=None if q_win == win else q_win))


_window_op = _define_op("window_attn", _window_impl, _like_q)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Union[BlockLayout, torch.Tensor, None] = None,
    *,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    key_tile: Optional[Tuple[int, int]] = None,
    softmax_scale: Optional[float] = None,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Block-sparse softmax attention with SAM's decomposed relative-position bias fused in. Forward only.

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_k, headdim), v: (batch, seqlen_k, nheads_k,
        headdim_v), nheads % nheads_k == 0; headdim_v is usually headdim, but may differ (both multiples of 8 from
        16 to 256: e.g. attention over values before their projection, as SAM 2's memory cross-attention runs).
        Any strides: a permuted view of a fused qkv projection works without a copy.
    block_mask: a BlockLayout (built once: the fast way), or a bool tensor (batch or 1, nheads or 1,
        ceil(seqlen_q / block_size), ceil(seqlen_k / block_size)), True where a query block attends to
        a key block (converted on every call). None: dense.
    rel_h: (batch, nheads, seqlen_q, kh), rel_w: (batch, nheads, seqlen_q, kw), kh * kw == seqlen_k. Adds
        rel_h[i, row(j)] + rel_w[i, col(j)] to logit (i, j), as SAM's add_decomposed_rel_pos; the
        N x N bias is never formed. -inf excludes the key; so does a logit so low that the row has no
        other: a query row whose every logit, q.k * softmax_scale + bias, is at most -1e38 * softmax_scale
        (in q.k units, q.k + bias / softmax_scale <= -1e38) is treated as having no key.
    key_tile: None: keys in raster order on the kh x kw grid (row = j // kw, col = j % kw). (th, tw): keys
        grouped in th x tw tiles, tiles in raster order (sam_sparse.masks.tile_permutation gives that order).
    softmax_scale: multiplies q.k, a number > 0; default headdim ** -0.5.
    block_size: mask granularity in tokens, a power of two >= 16; default 128, or the BlockLayout's.

    Returns (batch, seqlen_q, nheads, headdim_v) in q's dtype, contiguous. Query rows that attend to no
    key (an empty block row, seqlen_k == 0, or every key's logit -inf or at most -1e38 * softmax_scale:
    the Triton kernel carries -inf as a huge finite number, and the PyTorch path keeps the same rule) are
    zeros. Raises RuntimeError
    when an input requires grad with grad mode on: there is no backward pass.
    """
    _check_no_grad(q, k, v, rel_h, rel_w)
    fast = (block_mask is None or isinstance(block_mask, BlockLayout)) and not torch.compiler.is_compiling()
    if fast:
        try:
            key = _fast_key(q, k, v, block_mask, rel_h, rel_w, key_tile, softmax_scale, block_size)
            plan = _PLANS.get(key)
        except (AttributeError, TypeError):  # not tensors, unhashable key_tile...: the checks below say what
            key = plan = None
        if plan is not None:
            num = idx = None
            if block_mask is not None:
                num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
            return plan(q, k, v, num, idx, rel_h, rel_w, None, None)

    _check_qkv(q, k, v, varlen=False)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = k.shape[1]
    layout, bs = _to_layout(block_mask, block_size, batch, nheads, seqlen_q, seqlen_k, q.device)
    tile = check_rel(rel_h, rel_w, key_tile, q, seqlen_k)
    scale = check_scale(softmax_scale, headdim)
    num, idx = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    if torch.compiler.is_compiling():
        return _attn_op(q, k, v, num, idx, rel_h, rel_w, list(tile) if tile else None, scale, bs)
    if _ahead(q):
        _new_plan(q, k, v, num, idx, rel_h, rel_w, tile, scale, bs, ahead=True)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    plan = _new_plan(q, k, v, num, idx, rel_h, rel_w, tile, scale, bs)
    if fast and key is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan(q, k, v, num, idx, rel_h, rel_w, None, None)


def block_sparse_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_mask: Union[BlockLayout, torch.Tensor, None] = None,
    *,
    softmax_scale: Optional[float] = None,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Block-sparse attention over packed sequences of different lengths. Forward only.

    q: (total_q, nheads, headdim); k: (total_k, nheads_k, headdim), v: (total_k, nheads_k, headdim_v).
    cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,), cumulative lengths starting at 0, on q's device.
    max_seqlen_q, max_seqlen_k: the longest sequence on each side, ints given by the caller (reading them
        from cu_seqlens would cost a host sync per call).
    block_mask: BlockLayout or bool (num_seqs or 1, nheads or 1, ceil(max_seqlen_q / block_size),
        ceil(max_seqlen_k / block_size)); sequence i uses the top-left part that its lengths cover.
    Returns (total_q, nheads, headdim_v). A sequence with no keys gives zeros.

    Plans: one per (num_seqs, max_seqlen_q, the bucket of max_seqlen_k, head layout, dtype, mask shape),
    never per total length, so calls whose lengths change (a video's memories filling up) neither retune
    nor recompile. A call that finds its plan (a BlockLayout or no mask) launches with no host sync and
    no check of the cu_seqlens values, as flash-attn's varlen functions: they are checked (one
    device-to-host copy) on the call that makes the plan. Values that break the contract (not starting
    at 0, decreasing, not ending at the totals, a sequence longer than max_seqlen_*) are then undefined
    behaviour, as there.
    """
    _check_no_grad(q, k, v)
    fast = (block_mask is None or isinstance(block_mask, BlockLayout)) and not torch.compiler.is_compiling()
    key = None
    if fast and _is_length(max_seqlen_q) and _is_length(max_seqlen_k):
        try:
            num = idx = lbs = None
            if block_mask is not None:
                num, idx, lbs = block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.block_size
            key = _varlen_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num, idx, lbs,
                              softmax_scale, block_size)
            plan = _PLANS.get(key)
        except (AttributeError, TypeError):  # not tensors, ...: the checks below say what
            key = plan = None
        if plan is not None:
            return plan(q, k, v, num, idx, None, None, cu_seqlens_q, cu_seqlens_k)

    _check_qkv(q, k, v, varlen=True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k has {cu_seqlens_k.numel() - 1}"
        )
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name}={n!r}: expected an int >= 0")
    if not torch.compiler.is_compiling():
        longest_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        longest_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        if longest_q > max_seqlen_q or longest_k > max_seqlen_k:
            raise ValueError(
                f"max_seqlen_q={max_seqlen_q}, max_seqlen_k={max_seqlen_k} are below the longest sequences "
                f"({longest_q}, {longest_k}) in cu_seqlens"
            )
    num_seqs = cu_seqlens_q.numel() - 1
    layout, bs = _to_layout(block_mask, block_size, num_seqs, q.shape[1], max_seqlen_q, max_seqlen_k, q.device)
    scale = check_scale(softmax_scale, q.shape[-1])
    num, idx = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    if torch.compiler.is_compiling():
        return _attn_varlen_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num, idx, scale, bs)
    if _ahead(q):
        _new_plan(q, k, v, num, idx, None, None, None, scale, bs, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, ahead=True)
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    if key is None:  # a bool mask, converted above: keyed by its layout (this path checks every call)
        key = ("converted",) + _varlen_key(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, num, idx,
                                           None if num is None else bs, scale, bs)
    plan = _planned(key, lambda: _new_plan(q, k, v, num, idx, None, None, None, scale, bs, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k))
    return plan(q, k, v, num, idx, None, None, cu_seqlens_q, cu_seqlens_k)


def window_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: Tuple[int, int],
    block_mask: Union[BlockLayout, torch.Tensor, None] = None,
    *,
    q_window_size: Optional[Tuple[int, int]] = None,
    k_pad: Optional[torch.Tensor] = None,
    v_pad: Optional[torch.Tensor] = None,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    block_size: Optional[int] = None,
) -> torch.Tensor:
    """Attention inside the non-overlapping windows of a 2-D token grid, read and written in place. Forward only.

    The grid is cut into ceil(grid_h / wh) x ceil(grid_w / ww) windows of wh x ww tokens (raster order);
    each query attends to the keys of its own window. Where the last windows overhang the grid, the
    missing keys are padding tokens whose key and value are k_pad and v_pad: what a zero token gives after
    a projection with bias. This is partition -> attention -> unpartition -> crop, without the copies.

    q: (batch, grid_h, grid_w, nheads, headdim); k, v: (batch, grid_h, grid_w, nheads_k, headdim), any
        strides (views of a fused qkv projection work without a copy; on the kernel path, k and v are
        copied only if their head dim is not contiguous).
    window_size: (wh, ww) in tokens.
    q_window_size: (qh, qw), for queries on a grid of their own, q (batch, q_grid_h, q_grid_w, nheads,
        headdim) cut into qh x qw windows, as many per side as k's: query window (i, j) attends to key
        window (i, j) (Hiera's q-pooled blocks: q max-pooled by 2, qh = wh / 2). None: q is on k's grid.
    block_mask: over one window's qh * qw queries and wh * ww keys, raster order: a BlockLayout or a bool
        tensor (batch * windows or 1, nheads or 1, ceil(qh * qw / block_size), ceil(wh * ww / block_size));
        None: dense.
    k_pad, v_pad: (nheads_k, headdim), or None for zeros.
    rel_h: (batch, nheads, q_grid_h * q_grid_w, wh), rel_w: (batch, nheads, q_grid_h * q_grid_w, ww): per
        query (raster order over its grid) and per key row / column inside the window, as SAM's decomposed
        rel-pos terms; -inf excludes the key.
    softmax_scale: multiplies q.k, a number > 0; default headdim ** -0.5. block_size: as block_sparse_attn.

    Returns (batch, q_grid_h, q_grid_w, nheads, headdim) in q's dtype, contiguous. As in block_sparse_attn, a
    query whose every logit (q.k * softmax_scale + bias, padding keys included) is -inf or at most
    -1e38 * softmax_scale has no key and gives zeros.
    """
    _check_no_grad(q, k, v, k_pad, v_pad, rel_h, rel_w)
    fast = (block_mask is None or isinstance(block_mask, BlockLayout)) and not torch.compiler.is_compiling()
    key = None
    if fast:
        # A repeated call (SAM's window blocks, image after image) skips the checks: one dict lookup.
        try:
            key = ("window", tuple(window_size), None if q_window_size is None else tuple(q_window_size),
                   k_pad is None, v_pad is None,
                   _fast_key(q, k, v, block_mask, rel_h, rel_w, None, softmax_scale, block_size), _sig(k_pad), _sig(v_pad))
            plan = _PLANS.get(key)
        except (AttributeError, TypeError):  # not tensors, unhashable window_size...: the checks below say what
            key = plan = None
        if plan is not None:
            num, idx = (block_mask.kv_num_blocks, block_mask.kv_indices) if block_mask is not None else (None, None)
            return plan(q, k, v, num, idx, rel_h, rel_w, None, None, k_pad, v_pad)

    _check_qkv(q, k, v, varlen=False, grid=True, same_grid=q_window_size is None)
    batch, gh, gw, nheads, headdim = q.shape
    wh, ww = _check_window(window_size, k.shape[1:3])
    qh, qw = (wh, ww) if q_window_size is None else _check_window(q_window_size, (gh, gw), "q_window_size")
    if (-(-gh // qh), -(-gw // qw)) != (-(-k.shape[1] // wh), -(-k.shape[2] // ww)):
        raise ValueError(f"q_window_size={q_window_size!r} cuts q's grid {(gh, gw)} into "
                         f"{(-(-gh // qh), -(-gw // qw))} windows, but window_size={window_size!r} cuts k's grid "
                         f"{tuple(k.shape[1:3])} into {(-(-k.shape[1] // wh), -(-k.shape[2] // ww))}; they must match")
    windows = -(-gh // qh) * -(-gw // qw)
    layout, bs = _to_layout(block_mask, block_size, batch * windows, nheads, qh * qw, wh * ww, q.device)
    # check_rel reads only shapes and the device: a stride-0 stand-in for q as (batch, tokens, nheads, headdim)
    check_rel(rel_h, rel_w, None, q.new_empty(()).expand(batch, gh * gw, nheads, headdim), wh * ww)
    if rel_h is not None and (rel_h.shape[-1], rel_w.shape[-1]) != (wh, ww):
        raise ValueError(f"rel_h / rel_w have kh={rel_h.shape[-1]}, kw={rel_w.shape[-1]}; expected the window ({wh}, {ww})")
    pads = _check_pad("k_pad", k_pad, k), _check_pad("v_pad", v_pad, v)
    # Pointer loads with a head-dim stride other than 1 cannot be vectorized, hence not pipelined:
    # such k / v (never SAM's) are copied once here.
    kv = tuple(t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    scale = check_scale(softmax_scale, headdim)
    num, idx = (layout.kv_num_blocks, layout.kv_indices) if layout is not None else (None, None)
    if torch.compiler.is_compiling():
        return _window_op(q, *kv, *pads, num, idx, rel_h, rel_w, [wh, ww], [qh, qw], scale, bs)
    if _ahead(q):
        _new_plan(q, *kv, num, idx, rel_h, rel_w, None, scale, bs, window=(wh, ww),
                  q_window=None if (qh, qw) == (wh, ww) else (qh, qw), ahead=True)
        return q.new_empty(q.shape)
    plan = _window_plan(q, *kv, *pads, num, idx, rel_h, rel_w, (wh, ww), (qh, qw), scale, bs)
    # The fast path gets the plan only when the call needed no conversion: then its tensors are exactly
    # the ones checked here.
    if key is not None and pads[0] is k_pad and pads[1] is v_pad and kv[0] is k and kv[1] is v:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan(q, *kv, num, idx, rel_h, rel_w, None, None, *pads)
