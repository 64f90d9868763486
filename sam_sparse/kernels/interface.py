"""Block-sparse attention: the functional API, input checks, dispatch and the torch custom ops.

Argument names follow flash-attn's ``flash_attn_func`` / ``flash_attn_varlen_func``.

Dispatch: CUDA tensors run the Triton kernel (triton_attn.py). CPU tensors run the PyTorch reference
(reference.py), unless SAM_SPARSE_FORCE_TRITON=1 is set together with TRITON_INTERPRET=1 (set both
before this package launches its first kernel): then CPU tensors go through the same Triton kernel
in Triton's interpreter, which is how CI tests the kernel itself without a GPU.
"""

from __future__ import annotations

import importlib.util
import math
import os
import weakref
from typing import Optional, Tuple

import torch

from .reference import attention_reference, attention_reference_varlen

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = tuple(range(16, 257, 16))  # 16, 32, ..., 256: includes 80 (vit_h) and 16/32 (SAM's decoder)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


# Platforms without a Triton wheel (macOS, Windows, aarch64 CPUs) run everything on the reference path.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor) -> bool:
    if not HAS_TRITON:
        return False
    if t.is_cuda:
        return True
    return os.environ.get("SAM_SPARSE_FORCE_TRITON") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------------------------------------
# Block lists: the compacted form the kernel iterates (as FlexAttention's kv_num_blocks / kv_indices).
# ---------------------------------------------------------------------------------------------------

_LISTS_CACHE: "dict[int, tuple]" = {}


def block_lists(block_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Compact a bool block mask into per-row lists of active key blocks.

    block_mask: bool (Bm, Hm, QB, KB).
    Returns kv_num_blocks int32 (Bm, Hm, QB): active key blocks per query block, and kv_indices int32
    (Bm, Hm, QB, KB): their indices in ascending order, then the inactive ones (never read).
    Cached per mask tensor (until it is modified in place or freed), so a fixed mask costs nothing
    after its first call.
    """
    key = id(block_mask)
    hit = _LISTS_CACHE.get(key)
    if hit is not None and hit[0]() is block_mask and hit[1] == block_mask._version:
        return hit[2]
    num = block_mask.sum(dim=-1, dtype=torch.int32)
    # Stable sort of "inactive" puts active blocks first, in ascending key order (memory locality).
    idx = torch.argsort((~block_mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
    lists = (num.contiguous(), idx.contiguous())
    try:
        ref = weakref.ref(block_mask, lambda _, key=key: _LISTS_CACHE.pop(key, None))
    except TypeError:  # tensors that refuse weakrefs (some subclasses): no caching
        return lists
    _LISTS_CACHE[key] = (ref, block_mask._version, lists)
    return lists


# ---------------------------------------------------------------------------------------------------
# Checks. Every bad input raises ValueError naming the argument, what it was and what is accepted.
# ---------------------------------------------------------------------------------------------------


def _check_qkv(q, k, v, varlen: bool):
    ndim = 3 if varlen else 4
    layout = "(total, nheads, headdim)" if varlen else "(batch, seqlen, nheads, headdim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} has {_describe(t)}; expected {ndim}-D {layout}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has {_describe(t)}; supported dtypes are float16, bfloat16 and float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all tensors must share one device")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share one dtype")
    if k.shape != v.shape:
        raise ValueError(f"k has {_describe(k)} and v has {_describe(v)}; k and v must have the same shape")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]} (q: {_describe(q)}, k: {_describe(k)})")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if hk == 0 or hq % hk:
        raise ValueError(f"q has {hq} heads and k has {hk}; nheads must be a multiple of nheads_k (MQA/GQA)")
    if k.shape[-1] != d:
        raise ValueError(f"k has headdim {k.shape[-1]} but q has {d}; they must match")
    if d not in HEAD_DIMS:
        raise ValueError(f"headdim {d} (q: {_describe(q)}) is not supported; supported: multiples of 16 from 16 to 256")


def _check_block_mask(block_mask, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, block_size: int, device):
    if not isinstance(block_size, int) or block_size < 16 or block_size % 16:
        raise ValueError(f"block_size={block_size!r}: expected a positive multiple of 16 (16, 32, 64, 128, ...)")
    if block_mask is None:
        return
    qb, kb = -(-seqlen_q // block_size), -(-seqlen_k // block_size)
    want = f"bool ({batch} or 1, {nheads} or 1, {qb}, {kb}) for block_size={block_size}"
    if not isinstance(block_mask, torch.Tensor):
        raise ValueError(f"block_mask must be a bool tensor {want}, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask has {_describe(block_mask)}; expected {want}")
    if block_mask.device != device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {device}")
    s = block_mask.shape
    if block_mask.dim() != 4 or s[0] not in (1, batch) or s[1] not in (1, nheads) or s[2] != qb or s[3] != kb:
        raise ValueError(f"block_mask has shape {tuple(s)}; expected {want}")


def _check_rel(rel_h, rel_w, key_tile, q, seqlen_k: int):
    if rel_h is None and rel_w is None:
        if key_tile is not None:
            raise ValueError("key_tile describes the key order for rel_h / rel_w; pass it only with them")
        return None
    if rel_h is None or rel_w is None:
        raise ValueError("rel_h and rel_w go together: pass both or neither")
    batch, seqlen_q, nheads = q.shape[0], q.shape[1], q.shape[2]
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[:3]) != (batch, nheads, seqlen_q):
            got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} has {got}; expected ({batch}, {nheads}, {seqlen_q}, k{name[-1]}) = (batch, nheads, seqlen_q, grid size)")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has {_describe(t)}; supported dtypes are float16, bfloat16 and float32")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    if kh * kw != seqlen_k:
        raise ValueError(f"rel_h has kh={kh} and rel_w has kw={kw}, but kh * kw = {kh * kw} != seqlen_k = {seqlen_k}")
    if key_tile is None:
        return None
    try:
        th, tw = (int(x) for x in key_tile)
    except (TypeError, ValueError):
        raise ValueError(f"key_tile={key_tile!r}: expected a pair (th, tw) of positive ints") from None
    if th <= 0 or tw <= 0 or kh % th or kw % tw:
        raise ValueError(f"key_tile={key_tile!r} must divide the key grid ({kh}, {kw}) into whole tiles")
    return (th, tw)


def _check_cu_seqlens(name, cu, total: int, device):
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        got = _describe(cu) if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise ValueError(f"{name} has {got}; expected a 1-D int32 tensor (num_seqs + 1,) of cumulative lengths")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    if torch.compiler.is_compiling():
        return
    vals = cu.tolist()
    if vals[0] != 0 or any(b < a for a, b in zip(vals, vals[1:])) or vals[-1] != total:
        raise ValueError(f"{name}={vals[:8]}{'...' if len(vals) > 8 else ''}: must start at 0, never decrease and end at {total} (the total length)")


# ---------------------------------------------------------------------------------------------------
# Custom ops: one opaque node each under torch.compile, with fake implementations for tracing.
# ---------------------------------------------------------------------------------------------------


def _attn_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[torch.Tensor],
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
    key_tile: Optional[list[int]],
    softmax_scale: float,
    block_size: int,
) -> torch.Tensor:
    tile = tuple(key_tile) if key_tile is not None else None
    if _use_triton(q):
        from .triton_attn import attention_triton

        lists = block_lists(block_mask) if block_mask is not None else (None, None)
        return attention_triton(q, k, v, *lists, rel_h, rel_w, tile, softmax_scale, block_size)
    return attention_reference(q, k, v, block_mask, rel_h, rel_w, tile, softmax_scale, block_size)


# Eager calls go straight to the implementation: the custom-op dispatcher costs tens of microseconds
# per call, as much as a whole attention layer at batch 1. Traced calls need the op.
_attn_op = torch.library.custom_op("sam_sparse::block_sparse_attn", _attn_impl, mutates_args=())


@_attn_op.register_fake
def _(q, k, v, block_mask, rel_h, rel_w, key_tile, softmax_scale, block_size):
    return q.new_empty(q.shape)


def _attn_varlen_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_mask: Optional[torch.Tensor],
    softmax_scale: float,
    block_size: int,
) -> torch.Tensor:
    if _use_triton(q):
        from .triton_attn import attention_triton

        lists = block_lists(block_mask) if block_mask is not None else (None, None)
        return attention_triton(
            q, k, v, *lists, None, None, None, softmax_scale, block_size,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        )
    return attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, block_mask, softmax_scale, block_size)


_attn_varlen_op = torch.library.custom_op("sam_sparse::block_sparse_attn_varlen", _attn_varlen_impl, mutates_args=())


@_attn_varlen_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_mask, softmax_scale, block_size):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def block_sparse_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[torch.Tensor] = None,
    *,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    key_tile: Optional[Tuple[int, int]] = None,
    softmax_scale: Optional[float] = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Block-sparse softmax attention with SAM's decomposed relative-position bias fused in.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k == 0.
        Any strides: a permuted view of a fused qkv projection works without a copy.
    block_mask: bool (batch or 1, nheads or 1, ceil(seqlen_q / block_size), ceil(seqlen_k / block_size));
        True where a query block attends to a key block. None: dense.
    rel_h: (batch, nheads, seqlen_q, kh), rel_w: (batch, nheads, seqlen_q, kw), kh * kw == seqlen_k. Adds
        rel_h[i, row(j)] + rel_w[i, col(j)] to logit (i, j), as SAM's add_decomposed_rel_pos; the
        N x N bias is never formed.
    key_tile: None: keys in raster order on the kh x kw grid (row = j // kw, col = j % kw). (th, tw): keys
        grouped in th x tw tiles, tiles in raster order (geometry.tile_permutation gives that order).
    softmax_scale: multiplies q.k; default headdim ** -0.5.
    block_size: mask granularity in tokens, a multiple of 16.

    Returns (batch, seqlen_q, nheads, headdim) in q's dtype, contiguous. Query rows whose blocks attend
    to no key block are zeros.
    """
    _check_qkv(q, k, v, varlen=False)
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k = k.shape[1]
    _check_block_mask(block_mask, batch, nheads, seqlen_q, seqlen_k, block_size, q.device)
    tile = _check_rel(rel_h, rel_w, key_tile, q, seqlen_k)
    scale = headdim**-0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be a finite number")
    op = _attn_op if torch.compiler.is_compiling() else _attn_impl
    return op(q, k, v, block_mask, rel_h, rel_w, list(tile) if tile else None, scale, block_size)


def block_sparse_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    block_mask: Optional[torch.Tensor] = None,
    *,
    softmax_scale: Optional[float] = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Block-sparse attention over packed sequences of different lengths.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim).
    cu_seqlens_q, cu_seqlens_k: int32 (num_seqs + 1,), cumulative lengths starting at 0.
    max_seqlen_q, max_seqlen_k: the longest sequence on each side.
    block_mask: bool (num_seqs or 1, nheads or 1, ceil(max_seqlen_q / block_size),
        ceil(max_seqlen_k / block_size)); sequence i uses the top-left part that its lengths cover.
    Returns (total_q, nheads, headdim).
    """
    _check_qkv(q, k, v, varlen=True)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q has {cu_seqlens_q.numel() - 1} sequences but cu_seqlens_k has {cu_seqlens_k.numel() - 1}"
        )
    if not torch.compiler.is_compiling():
        longest_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        longest_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
        if longest_q > max_seqlen_q or longest_k > max_seqlen_k:
            raise ValueError(
                f"max_seqlen_q={max_seqlen_q}, max_seqlen_k={max_seqlen_k} are below the longest sequences "
                f"({longest_q}, {longest_k}) in cu_seqlens"
            )
    num_seqs = cu_seqlens_q.numel() - 1
    _check_block_mask(block_mask, num_seqs, q.shape[1], max_seqlen_q, max_seqlen_k, block_size, q.device)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    op = _attn_varlen_op if torch.compiler.is_compiling() else _attn_varlen_impl
    return op(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), block_mask, scale, block_size
    )
