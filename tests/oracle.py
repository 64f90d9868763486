"""An independent float64 oracle: plain matmul + softmax with the full bias and mask materialized.

Deliberately written differently from sam_sparse.kernels.reference (no chunking, explicit N x N bias
built from SAM's own formula), so that the two can check each other. Small shapes only.
"""

import torch


def key_rows_cols(kh, kw, key_tile):
    """Raster (row, col) of each key position, by building the tiled grid explicitly."""
    grid = torch.arange(kh * kw).view(kh, kw)
    if key_tile is not None:
        th, tw = key_tile
        grid = grid.view(kh // th, th, kw // tw, tw).permute(0, 2, 1, 3)
    order = grid.reshape(-1)  # position p holds raster token order[p]
    return order // kw, order % kw


def _apply_mask(logits, block_mask, block_size):
    """Expand the block mask to tokens; masked logits -> -inf."""
    B, H, Nq, Nk = logits.shape
    full = block_mask.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    full = full[:, :, :Nq, :Nk].expand(B, H, Nq, Nk)
    return logits.masked_fill(~full, float("-inf"))


def _empty_rows(logits):
    """Rows whose every logit is -inf (masked out, or a -inf bias on every key) attend to nothing: zeros."""
    empty = torch.isneginf(logits).all(dim=-1, keepdim=True)
    return logits.masked_fill(empty, 0.0), empty


def oracle_attention(q, k, v, block_mask=None, rel_h=None, rel_w=None, key_tile=None, scale=None, block_size=128):
    """q (B, Nq, H, D); k, v (B, Nk, Hk, D); returns float64 (B, Nq, H, D). Empty rows give zeros."""
    D, H, Hk = q.shape[-1], q.shape[2], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q64 = q.double().permute(0, 2, 1, 3)
    k64 = k.double().permute(0, 2, 1, 3).repeat_interleave(H // Hk, dim=1)
    v64 = v.double().permute(0, 2, 1, 3).repeat_interleave(H // Hk, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q64, k64) * scale
    if rel_h is not None:
        rows, cols = key_rows_cols(rel_h.shape[-1], rel_w.shape[-1], key_tile)
        bias = rel_h.double()[..., rows.to(q.device)] + rel_w.double()[..., cols.to(q.device)]
        logits = logits + bias
    if block_mask is not None:
        logits = _apply_mask(logits, block_mask, block_size)
    logits, empty = _empty_rows(logits)
    p = torch.softmax(logits, dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, v64).permute(0, 2, 1, 3)


def same_dtype_torch(q, k, v, block_mask=None, rel_h=None, rel_w=None, key_tile=None, scale=None, block_size=128):
    """The same computation done by PyTorch in the inputs' dtype: the yardstick for rounding error."""
    D, H, Hk = q.shape[-1], q.shape[2], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qt, kt, vt = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    kt, vt = kt.repeat_interleave(H // Hk, dim=1), vt.repeat_interleave(H // Hk, dim=1)
    logits = (qt @ kt.transpose(-1, -2)) * scale
    if rel_h is not None:
        rows, cols = key_rows_cols(rel_h.shape[-1], rel_w.shape[-1], key_tile)
        logits = logits + (rel_h.to(q.dtype)[..., rows.to(q.device)] + rel_w.to(q.dtype)[..., cols.to(q.device)])
    if block_mask is not None:
        logits = _apply_mask(logits, block_mask, block_size)
    logits, empty = _empty_rows(logits)
    p = torch.softmax(logits.float(), dim=-1).to(q.dtype).masked_fill(empty, 0.0)
    return (p @ vt).permute(0, 2, 1, 3)


def rel_error(out, ref):
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
