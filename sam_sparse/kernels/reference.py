"""Pure-PyTorch block-sparse attention: the CPU path, and what the Triton kernel must agree with.

Same semantics as the Triton kernel (see interface.py), computed one chunk of query rows at a time so
that at most (batch, heads, chunk, seqlen_k) scores exist at once, never the whole N x N.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Scores held at once, in elements: bounds memory on the CPU to about 256 MB of float32.
_MAX_SCORE_ELEMS = 1 << 26

# A row whose largest logit is at or below NEG_CUT * softmax_scale (in q.k units: q.k + bias / scale <=
# NEG_CUT) has no key and gives zeros, as a row of -inf does. The Triton kernel's rule (its NEG_CUT):
# inside its matrix products it carries -inf as a huge finite number, so it cannot tell the two apart.
NEG_CUT = -1.0e38


def key_grid_index(kh: int, kw: int, key_tile: Optional[Tuple[int, int]], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row, col) on the kh x kw key grid of each key position, raster or tiled order; two (kh*kw,) int64."""
    j = torch.arange(kh * kw, device=device)
    if key_tile is None:
        return j // kw, j % kw
    th, tw = key_tile
    per_tile = th * tw
    tile, inner = j // per_tile, j % per_tile
    tiles_per_row = kw // tw
    return (tile // tiles_per_row) * th + inner // tw, (tile % tiles_per_row) * tw + inner % tw


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: Optional[torch.Tensor] = None,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    key_tile: Optional[Tuple[int, int]] = None,
    softmax_scale: float = 1.0,
    block_size: int = 128,
) -> torch.Tensor:
    """Block-sparse attention in plain PyTorch (inputs already validated).

    q: (B, Nq, H, D); k: (B, Nk, Hk, D), v: (B, Nk, Hk, Dv) with H % Hk == 0.
    block_mask: bool (B|1, H|1, ceil(Nq/bs), ceil(Nk/bs)) or None; rel_h (B, H, Nq, kh), rel_w (B, H, Nq, kw).
    Returns (B, Nq, H, Dv) contiguous, in q's dtype; rows with no key (masked, every logit -inf or at most
    NEG_CUT * softmax_scale, or Nk == 0) give zeros. Computes in float32 (float64 for float64 inputs).
    """
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    cdt = _compute_dtype(q.dtype)
    qh = q.transpose(1, 2).to(cdt)  # (B, H, Nq, D)
    kh_ = k.transpose(1, 2).to(cdt).repeat_interleave(H // Hk, dim=1)  # (B, H, Nk, D)
    vh = v.transpose(1, 2).to(cdt).repeat_interleave(H // Hk, dim=1)
    if Nk == 0:  # no key at all: every row attends to nothing
        return torch.zeros(B, Nq, H, v.shape[-1], dtype=q.dtype, device=q.device)
    out = torch.empty(B, Nq, H, v.shape[-1], dtype=q.dtype, device=q.device)
    if rel_h is not None:
        rows, cols = key_grid_index(rel_h.shape[-1], rel_w.shape[-1], key_tile, q.device)
    if block_mask is not None:
        key_block = torch.arange(Nk, device=q.device) // block_size
    chunk = max(1, _MAX_SCORE_ELEMS // max(1, B * H * Nk))
    for s in range(0, Nq, chunk):
        e = min(Nq, s + chunk)
        scores = (qh[:, :, s:e] @ kh_.transpose(-1, -2)) * softmax_scale
        if rel_h is not None:
            scores = scores + rel_h[:, :, s:e].to(cdt)[..., rows] + rel_w[:, :, s:e].to(cdt)[..., cols]
        if block_mask is not None:
            q_block = torch.arange(s, e, device=q.device) // block_size
            keep = block_mask[:, :, q_block][..., key_block]  # (B|1, H|1, e-s, Nk)
            scores = scores.masked_fill(~keep, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True)
        # A row with no key (its max -inf, or at most the cut) subtracts +inf: exp() gives 0, not NaN.
        no_key = row_max <= NEG_CUT * softmax_scale
        row_max = torch.where(no_key, torch.full_like(row_max, float("inf")), row_max)
        p = torch.exp(scores - row_max)
        denom = p.sum(dim=-1, keepdim=True)
        out[:, s:e] = ((p @ vh) / torch.where(denom == 0, torch.ones_like(denom), denom)).transpose(1, 2)
    return out


def attention_reference_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, block_mask=None, softmax_scale=1.0, block_size=128
) -> torch.Tensor:
    """Varlen form: q (total_q, H, D), k (total_k, Hk, D), v (total_k, Hk, Dv); sequence i is rows cu[i]:cu[i+1]."""
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]))  # sequences with no query or no key stay zeros
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs, qe, ks, ke = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if qe == qs or ke == ks:
            continue
        mask = None
        if block_mask is not None:
            m = block_mask[i : i + 1] if block_mask.shape[0] > 1 else block_mask
            mask = m[:, :, : -(-(qe - qs) // block_size), : -(-(ke - ks) // block_size)]
        out[qs:qe] = attention_reference(
            q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], mask, softmax_scale=softmax_scale, block_size=block_size
        )[0]
    return out


def attention_reference_window(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: Tuple[int, int],
    k_pad: torch.Tensor,
    v_pad: torch.Tensor,
    block_mask: Optional[torch.Tensor] = None,
    rel_h: Optional[torch.Tensor] = None,
    rel_w: Optional[torch.Tensor] = None,
    softmax_scale: float = 1.0,
    block_size: int = 128,
    q_window: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Window attention the long way: pad the grid, cut it into windows, attend, put it back, crop.

    q: (B, GHq, GWq, H, D); k, v: (B, GH, GW, Hk, D); window (wh, ww) on k's grid; q_window (qh, qw) on
    q's grid (None: window, and q's grid is k's); query window (i, j) attends to key window (i, j).
    k_pad, v_pad (Hk, D): the keys and values of padding tokens. block_mask: bool (B * windows | 1,
    H | 1, QB, KB) over one window's queries and keys. rel_h (B, H, GHq * GWq, wh), rel_w (B, H,
    GHq * GWq, ww), queries in raster order over their grid. Returns (B, GHq, GWq, H, D) contiguous, in
    q's dtype.
    """
    B, GHq, GWq, H, D = q.shape

    def windows(t: torch.Tensor, win: Tuple[int, int], fill: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, gh, gw, *rest) -> (B * windows, wh * ww, *rest), padding with `fill` (zeros if None)."""
        (gh, gw), (wh, ww), rest = t.shape[1:3], win, t.shape[3:]
        ph, pw = -gh % wh, -gw % ww
        padded = t.new_zeros((B, gh + ph, gw + pw, *rest)) if fill is None else fill.expand(B, gh + ph, gw + pw, *rest).clone()
        padded[:, :gh, :gw] = t
        padded = padded.view(B, (gh + ph) // wh, wh, (gw + pw) // ww, ww, *rest).transpose(2, 3)
        return padded.reshape(-1, wh * ww, *rest)

    qh, qw = q_window or window

    def rel_windows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None:
            return None
        grid = t.reshape(B, H, GHq, GWq, t.shape[-1]).permute(0, 2, 3, 1, 4)  # (B, GHq, GWq, H, k)
        return windows(grid, (qh, qw), None).permute(0, 2, 1, 3)  # (B * windows, H, qh * qw, k)

    out = attention_reference(
        windows(q, (qh, qw), None), windows(k, window, k_pad.to(k.dtype)), windows(v, window, v_pad.to(v.dtype)),
        block_mask, rel_windows(rel_h), rel_windows(rel_w), None, softmax_scale, block_size,
    )  # (B * windows, qh * qw, H, D)
    nr, nc = -(-GHq // qh), -(-GWq // qw)
    out = out.view(B, nr, nc, qh, qw, H, D).transpose(2, 3).reshape(B, nr * qh, nc * qw, H, D)
    return out[:, :GHq, :GWq].contiguous()


def upscale_project_reference(x: torch.Tensor, grid: Tuple[int, int], w1: torch.Tensor, b1: torch.Tensor,
                              ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float, w2: torch.Tensor,
                              b2: torch.Tensor, hyper: torch.Tensor, add1: Optional[torch.Tensor] = None,
                              add2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """upscale.upscale_project the long way, with torch's own transposed convolutions: x (B, h*w, C) ->
    (B, M, 4h, 4w), in float64 when x is float64, else float32 (weights cast to match)."""
    B, _, C = x.shape
    h, w = grid
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):  # the dtype promised, under a caller's autocast too
        y = F.conv_transpose2d(x.to(dt).transpose(1, 2).reshape(B, C, h, w), w1.to(dt), b1.to(dt), stride=2)
        if add1 is not None:
            y = y + add1.to(dt)
        mean = y.mean(1, keepdim=True)
        var = (y - mean).pow(2).mean(1, keepdim=True)
        y = (y - mean) / torch.sqrt(var + eps)
        y = F.gelu(ln_weight.to(dt)[:, None, None] * y + ln_bias.to(dt)[:, None, None])
        z = F.conv_transpose2d(y, w2.to(dt), b2.to(dt), stride=2)
        z = F.gelu(z if add2 is None else z + add2.to(dt))
        return (hyper.to(dt) @ z.flatten(2)).view(B, hyper.shape[1], 4 * h, 4 * w)


def few_key_attention_norm_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor,
                                     ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
                                     softmax_scale: float = 1.0, k_bias: Optional[torch.Tensor] = None,
                                     out_bias: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None
                                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """few_keys.few_key_attention_norm with torch's own ops: q (1 | B, N, C), k and v (B, H, T, C), residual
    (1 | B, N, C) -> y (B, N, C) and y + pos (or None), in float64 when q is float64, else float32."""
    B, H, T, C = k.shape
    N = q.shape[1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):  # the dtype promised, under a caller's autocast too
        kf = k.to(dt).reshape(B, H * T, C)
        if q.shape[0] == 1:  # one (N, C) @ (C, B * H * T) product for a query set every sample shares
            s = (q[0].to(dt) @ kf.reshape(B * H * T, C).t()).view(N, B, H * T).transpose(0, 1)
        else:
            s = torch.bmm(q.to(dt), kf.transpose(1, 2))
        s = s * softmax_scale
        if k_bias is not None:
            s = s + k_bias.to(dt).reshape(B, 1, H * T)
        p = torch.softmax(s.view(B, N, H, T), dim=-1).reshape(B, N, H * T)
        o = torch.bmm(p, v.to(dt).reshape(B, H * T, C))
        if out_bias is not None:
            o = o + out_bias.to(dt)
        y = F.layer_norm(residual.to(dt) + o, (C,), ln_weight.to(dt), ln_bias.to(dt), eps)
        return y, (None if pos is None else y + pos.to(dt))


def resize_reference(x: torch.Tensor, size: Tuple[int, int], mid: Optional[Tuple[int, int, int, int]] = None
                     ) -> torch.Tensor:
    """resize.resized_stats' and resized_masks' resize with F.interpolate: x (K, h, w) -> (K, H, W), through
    (MH, MW) and its top-left (CH, CW) when mid is given; float64 for float64 x, else float32."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.shape[0] == 0:
        return x.new_zeros((0, *size), dtype=dt)
    with torch.autocast(x.device.type, enabled=False):
        v = x.to(dt)[:, None]
        if mid is not None:
            v = F.interpolate(v, mid[:2], mode="bilinear", align_corners=False)[..., :mid[2], :mid[3]]
        return F.interpolate(v, size, mode="bilinear", align_corners=False)[:, 0]


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor]) -> None:
    """rotary.rotary_embedding_ in torch, in place: complex multiplication in float32 (float64 inputs stay
    float64), as SAM 2's apply_rotary_enc computes it. x (B, H, N, D); cos, sin (T, D/2); positions (N,) or None."""
    n = x.shape[-2]
    rows = positions.long() if positions is not None else torch.arange(n, device=x.device) % cos.shape[0]
    keep = rows >= 0
    if not bool(keep.any()):
        return
    ctype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    table = torch.complex(cos, sin).to(ctype)[rows[keep]]  # (kept tokens, D/2)
    kept = x[..., keep, :]
    xc = torch.view_as_complex(kept.to(table.real.dtype).reshape(*kept.shape[:-1], -1, 2))
    x[..., keep, :] = torch.view_as_real(xc * table).flatten(-2).to(x.dtype)
