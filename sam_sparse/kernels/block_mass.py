"""Where softmax attention probability goes, per (query block, key block): the statistics that
calibration (issue 13) chooses key blocks from. Dense attention, forward only.

block_attention_mass takes block_sparse_attn's inputs (same layout, GQA, fused decomposed rel-pos
bias, key order, scale) and never forms a layer's N x N attention matrix:
  CUDA tensors, Triton importable: two passes of the kernel in triton_mass.py (each query row's
    log-sum-exp, then exp(s - lse) summed per tile); extra memory B*H*Nq floats plus one float per
    (query tile, key tile).
  otherwise (CPU, no Triton, float64): PyTorch, a chunk of query rows at a time, holding at most
    _MAX_SCORE_ELEMS logits at once.
The Triton kernel lives in its own module so that importing this one never imports Triton (as
interface.py / triton_attn.py).
"""

from __future__ import annotations

import importlib.util
from typing import Optional, Tuple

import torch

from .interface import check_heads, check_rel, check_scale, describe_tensor
from .layout import check_block_size

HAS_TRITON = importlib.util.find_spec("triton") is not None
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Logits held at once by the PyTorch path, in elements: about 256 MB of float32 (as reference.py).
_MAX_SCORE_ELEMS = 1 << 26


def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    key_tile: Optional[Tuple[int, int]] = None,
    softmax_scale: Optional[float] = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Softmax probability mass per (query block, key block) of dense attention. No gradient.

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_k, headdim), nheads % nheads_k
        == 0 (query head h reads key head h // (nheads // nheads_k)); any strides; float16, bfloat16,
        float32 or float64 (float64 is computed in float64 on the PyTorch path).
    rel_h: (batch, nheads, seqlen_q, kh), rel_w: (batch, nheads, seqlen_q, kw), kh * kw == seqlen_k:
        logit (i, j) gains rel_h[i, row(j)] + rel_w[i, col(j)], as block_sparse_attn. -inf excludes a key.
    key_tile: None: keys in raster order on the kh x kw grid; (th, tw): keys in th x tw tiles, tiles in
        raster order (as block_sparse_attn).
    softmax_scale: multiplies q.k, a number > 0; default headdim ** -0.5.
    block_size: tokens per block on both sides, a power of two >= 16.

    Returns float32 (batch, nheads, ceil(seqlen_q / block_size), ceil(seqlen_k / block_size)):
    entry [b, h, i, j] = sum over the queries of query block i of the probability each puts on the
    keys of key block j, in units of queries. Each query contributes 1 in total, so row i sums to the
    number of queries in block i; a query whose every key has a -inf bias attends to nothing and
    contributes 0 (block_sparse_attn gives it a zero output).
    """
    tile, scale, bs = _check(q, k, rel_h, rel_w, key_tile, softmax_scale, block_size)
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k = k.shape[1]
    with torch.no_grad():  # a measurement: nothing to differentiate
        if seqlen_q == 0 or seqlen_k == 0:
            return torch.zeros(batch, nheads, -(-seqlen_q // bs), -(-seqlen_k // bs), device=q.device)
        if q.is_cuda and HAS_TRITON and q.dtype != torch.float64:
            from .triton_mass import mass_triton

            return mass_triton(q, k, rel_h, rel_w, tile, scale, bs)
        return mass_torch(q, k, rel_h, rel_w, tile, scale, bs)


def _check(q, k, rel_h, rel_w, key_tile, softmax_scale, block_size):
    """(key_tile or None, scale, block_size) of valid inputs; ValueError naming what is wrong otherwise."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has {describe_tensor(t)}; expected 4-D (batch, seqlen, nheads, headdim)")
        if t.dtype not in DTYPES:
            raise ValueError(f"{name} has {describe_tensor(t)}; supported dtypes are float16, bfloat16, float32 and float64")
    if k.device != q.device or k.dtype != q.dtype:
        raise ValueError(f"q has {describe_tensor(q)} and k has {describe_tensor(k)}; they must share dtype and device")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {q.shape[0]}")
    d, seqlen_k = q.shape[-1], k.shape[1]
    check_heads(q, k)
    bs = check_block_size(block_size)
    scale = check_scale(softmax_scale, d)
    return check_rel(rel_h, rel_w, key_tile, q, seqlen_k, DTYPES), scale, bs


def _sum_blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    """(..., n) -> (..., ceil(n / bs)): sums of consecutive runs of bs entries, the last one partial."""
    n = x.shape[-1]
    full = n - n % bs
    parts = [x[..., :full].unflatten(-1, (full // bs, bs)).sum(-1)]
    if full < n:
        parts.append(x[..., full:].sum(-1, keepdim=True))
    return torch.cat(parts, dim=-1)


def mass_torch(q, k, rel_h, rel_w, key_tile, softmax_scale: float, block_size: int) -> torch.Tensor:
    """The PyTorch path (inputs validated by block_attention_mass; shapes as there). float32 result.

    Computes in float32 (float64 for float64 q). Peak extra memory: one chunk of logits, at most
    _MAX_SCORE_ELEMS elements (but at least one query row: batch * nheads * seqlen_k), plus k in the
    compute dtype and (batch, nheads, chunk, key blocks)-sized sums.
    """
    B, Nq, H, _ = q.shape
    Nk = k.shape[1]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    kt = k.to(cdt).transpose(1, 2).contiguous().transpose(-1, -2)  # (B, Hk, D, Nk), one copy for all chunks
    grid = None
    if rel_h is not None:
        kh, kw = rel_h.shape[-1], rel_w.shape[-1]
        th, tw = key_tile if key_tile is not None else (kh, kw)  # raster order is one tile of the whole grid
        grid = (kh // th, kw // tw, th, tw)
    out = torch.zeros(B, H, -(-Nq // block_size), -(-Nk // block_size), dtype=torch.float64, device=q.device)
    chunk = max(1, _MAX_SCORE_ELEMS // (B * H * Nk))
    for s in range(0, Nq, chunk):
        e = min(Nq, s + chunk)
        rh, rw = (rel_h[:, :, s:e], rel_w[:, :, s:e]) if grid else (None, None)
        per_query = _chunk_mass(q[:, s:e], kt, rh, rw, grid, softmax_scale, block_size)
        out.index_add_(2, torch.arange(s, e, device=q.device) // block_size, per_query.to(torch.float64))
    return out.float()


def _chunk_mass(q, kt, rel_h, rel_w, grid, scale: float, bs: int) -> torch.Tensor:
    """Per-query mass per key block of c query rows: (B, H, c, KB) in kt's dtype.

    q: (B, c, H, D); kt: (B, Hk, D, Nk); rel_h (B, H, c, kh), rel_w (B, H, c, kw) or None; grid: the
    key order as (tile rows, tile cols, th, tw). The chunk's logits die when this returns, so that the
    next chunk's never coexist with them.
    """
    B, c, H, D = q.shape
    Hk, Nk = kt.shape[1], kt.shape[-1]
    G = H // Hk
    # GQA: the G query heads of one key head become G * c rows of one product (k is not repeated).
    qc = q.to(kt.dtype).unflatten(2, (Hk, G)).permute(0, 2, 3, 1, 4).reshape(B, Hk, G * c, D)
    scores = torch.matmul(qc, kt).view(B, H, c, Nk).mul_(scale)  # head h = hk * G + g
    if rel_h is not None:
        # Key j sits at (tile row, tile col, row in tile, col in tile), in this order of strides, so a
        # view of the logits in these four dims takes rel_h / rel_w by broadcasting: no gather.
        tr, tc, th, tw = grid
        g = scores.view(B, H, c, *grid)
        g += rel_h.to(kt.dtype).reshape(B, H, c, tr, 1, th, 1)
        g += rel_w.to(kt.dtype).reshape(B, H, c, 1, tc, 1, tw)
    row_max = scores.amax(dim=-1, keepdim=True)
    # A row with no key is all -inf: subtract 0 instead, so that exp() gives 0, not NaN.
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    p = scores.sub_(row_max).exp_()
    denom = p.sum(dim=-1, keepdim=True)
    return _sum_blocks(p, bs) / torch.where(denom == 0, torch.ones_like(denom), denom)
