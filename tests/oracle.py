"""An independent float64 oracle: plain matmul + softmax with the full bias and mask materialized.

Deliberately written differently from sam_sparse.kernels.reference (no chunking, explicit N x N bias
built from SAM's own formula), so that the two can check each other. Small shapes only.
"""

import itertools

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
    """q (B, Nq, H, D); k (B, Nk, Hk, D), v (B, Nk, Hk, Dv); returns float64 (B, Nq, H, Dv). Empty rows give zeros."""
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


def check_attention(out, q, k, v, mask, block_size, seed, floor, row_floor, scale=None, rel_h=None, rel_w=None,
                    key_tile=None):
    """Assert attention output out (B, Nq, H, Dv) against oracle_attention, globally and per (query, head) row,
    relative to the same computation by PyTorch in q's dtype (2x its error plus floor[dtype] /
    row_floor[dtype]); NaN anywhere (a poisoned row left unwritten) fails; every row the oracle gives as
    zeros (a query block with no key block) must be exactly zero. rel_h / rel_w / key_tile: SAM's
    decomposed rel-pos bias, as oracle_attention takes it. Returns the oracle's output."""
    want = (*q.shape[:-1], v.shape[-1])
    assert out.shape == want and out.dtype == q.dtype, f"seed {seed}: {tuple(out.shape)} {out.dtype}"
    assert not torch.isnan(out).any(), f"seed {seed}: NaN in the output (or a query row left unwritten)"
    assert torch.isfinite(out).all(), f"seed {seed}: inf in the output"
    ref = oracle_attention(q, k, v, mask, rel_h, rel_w, key_tile, scale=scale, block_size=block_size)
    base = same_dtype_torch(q, k, v, mask, rel_h, rel_w, key_tile, scale=scale, block_size=block_size)
    err, err_base = rel_error(out, ref), rel_error(base, ref)
    assert err <= 2 * err_base + floor[q.dtype], f"seed {seed}: error {err:.3g} vs PyTorch {q.dtype} {err_base:.3g}"
    row_err = (out.double() - ref).abs().amax(dim=-1)  # (B, Nq, H)
    row_base = (base.double() - ref).abs().amax(dim=-1)
    bad = row_err > 2 * row_base + row_floor[q.dtype]
    assert not bad.any(), (f"seed {seed}: {int(bad.sum())} rows off, worst {row_err.max():.3g}, "
                           f"first (b, query, h) {bad.nonzero()[0].tolist()}")
    zero_rows = (ref == 0).all(dim=-1)
    assert (out[zero_rows] == 0).all(), f"seed {seed}: a query with no key left must give zeros"
    return ref


def packed_inputs(g, lens_q, lens_k, heads, kv_heads, head_dim, dtype):
    """Random packed sequences: q (sum(lens_q), heads, head_dim), k and v (sum(lens_k), kv_heads, head_dim)
    in dtype, and their int32 cu_seqlens."""
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32) for lens in (lens_q, lens_k))
    q = torch.randn(int(cu_q[-1]), heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(int(cu_k[-1]), kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    return q, k, v, cu_q, cu_k


def check_varlen(out, q, k, v, cu_q, cu_k, mask, block_size, seed, floor, row_floor):
    """check_attention for packed sequences (total, H, D): each sequence's rows against the oracle on its own
    q, k, v, with the top-left part of its mask row (mask: (sequences, H, query blocks, key blocks) or None)."""
    for i in range(cu_q.numel() - 1):
        qs, qe, ks, ke = (int(x) for x in (cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]))
        m = None
        if mask is not None:
            m = mask[i : i + 1, :, : -(-(qe - qs) // block_size), : -(-(ke - ks) // block_size)]
        check_attention(out[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], m, block_size,
                        f"{seed} (sequence {i})", floor, row_floor)


def oracle_window(q, k, v, window, k_pad, v_pad, block_mask=None, rel_h=None, rel_w=None, scale=None, block_size=128,
                  q_window=None):
    """Window attention on a token grid, one window at a time; returns float64 (B, GH, GW, H, D).

    q (B, GH, GW, H, D); k, v (B, GH, GW, Hk, D); window (wh, ww); k_pad, v_pad (Hk, D) or None (zeros):
    the key and value of a window position off the grid, taken in k's / v's dtype (as window_attn does).
    Each window's tokens are gathered by explicit (y, x) index lists (no pad / view / permute of the
    whole grid, unlike reference.attention_reference_window), attended with oracle_attention, and the
    on-grid outputs are scattered back. block_mask: bool (B * windows | 1, H | 1, QB, KB) over one
    window's tokens in raster order; rel_h (B, H, GH * GW, wh), rel_w (B, H, GH * GW, ww) with queries
    in raster order over the whole grid. q_window (qh, qw): q lies on a grid of its own (B, GHq, GWq, H, D),
    cut into qh x qw windows; query window (i, j) attends to key window (i, j) (window_attn's q_window_size).
    """
    return _per_window(oracle_attention, torch.float64, q, k, v, window, k_pad, v_pad, block_mask, rel_h, rel_w,
                       scale, block_size, q_window)


def same_dtype_window(q, k, v, window, k_pad, v_pad, block_mask=None, rel_h=None, rel_w=None, scale=None,
                      block_size=128, q_window=None):
    """oracle_window's computation done by PyTorch in the inputs' dtype (same_dtype_torch per window):
    the yardstick for rounding error. Returns (B, GH, GW, H, D) in q's dtype."""
    return _per_window(same_dtype_torch, q.dtype, q, k, v, window, k_pad, v_pad, block_mask, rel_h, rel_w,
                       scale, block_size, q_window)


def check_window(out, q, k, v, window, k_pad, v_pad, mask, rel_h, rel_w, scale, block_size, seed, floor, row_floor,
                 empty=(), q_window=None):
    """Assert window_attn's output against oracle_window, globally and per (query, head) row, relative to
    the same computation by PyTorch in q's dtype (2x its error plus floor[dtype] / row_floor[dtype]).

    out must be q-shaped, q's dtype, contiguous, finite. empty: (b, h, raster query) triples the oracle
    must give as zeros; every row the oracle gives as zeros (no key left) must be exactly zero in out.
    Returns the oracle's output."""
    B, GH, GW, H, D = q.shape
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous(), (
        f"seed {seed}: {tuple(out.shape)} {out.dtype}, contiguous {out.is_contiguous()}")
    assert not torch.isnan(out).any(), f"seed {seed}: NaN in the output (or a query left unwritten)"
    assert torch.isfinite(out).all(), f"seed {seed}: inf in the output"
    ref = oracle_window(q, k, v, window, k_pad, v_pad, mask, rel_h, rel_w, scale, block_size, q_window)
    base = same_dtype_window(q, k, v, window, k_pad, v_pad, mask, rel_h, rel_w, scale, block_size, q_window)
    err, err_base = rel_error(out, ref), rel_error(base, ref)
    assert err <= 2 * err_base + floor[q.dtype], f"seed {seed}: error {err:.3g} vs PyTorch {q.dtype} {err_base:.3g}"
    row_err = (out.double() - ref).abs().amax(dim=-1)  # (B, GH, GW, H)
    row_base = (base.double() - ref).abs().amax(dim=-1)
    bad = row_err > 2 * row_base + row_floor[q.dtype]
    assert not bad.any(), (f"seed {seed}: {int(bad.sum())} rows off, worst {row_err.max():.3g}, "
                           f"first (b, y, x, h) {bad.nonzero()[0].tolist()}")
    zero_rows = (ref == 0).all(dim=-1)
    for b, h, n in empty:
        assert zero_rows[b, n // GW, n % GW, h], f"seed {seed}: the oracle should give zeros at {(b, h, n)}"
    assert (out[zero_rows] == 0).all(), f"seed {seed}: a query with no key left must give zeros"
    return ref


def _window_positions(wy, wx, win, grid, dev):
    """Window (wy, wx)'s positions (raster order inside it) on a grid: (on, off, ys, xs): the indices of
    the positions on the grid and of those past its bottom or right edge, and the on-grid coordinates."""
    (wh, ww), (gh, gw) = win, grid
    pos = [(wy * wh + r, wx * ww + c) for r in range(wh) for c in range(ww)]
    t_on = [t for t, (y, x) in enumerate(pos) if y < gh and x < gw]
    t_off = [t for t, (y, x) in enumerate(pos) if not (y < gh and x < gw)]
    ys = torch.tensor([pos[t][0] for t in t_on], device=dev, dtype=torch.long)
    xs = torch.tensor([pos[t][1] for t in t_on], device=dev, dtype=torch.long)
    as_index = lambda t: torch.tensor(t, device=dev, dtype=torch.long)  # noqa: E731
    return as_index(t_on), as_index(t_off), ys, xs


def _per_window(attend, out_dtype, q, k, v, window, k_pad, v_pad, block_mask, rel_h, rel_w, scale, block_size,
                q_window=None):
    B, GH, GW, H, D = q.shape
    Hk = k.shape[3]
    wh, ww = window
    qh, qw_ = q_window or window
    n_cols = -(-k.shape[2] // ww)
    n_win = -(-k.shape[1] // wh) * n_cols
    dev = q.device
    kp = torch.zeros(Hk, D, dtype=k.dtype, device=dev) if k_pad is None else k_pad.to(k.dtype)
    vp = torch.zeros(Hk, D, dtype=v.dtype, device=dev) if v_pad is None else v_pad.to(v.dtype)
    out = torch.full((B, GH, GW, H, D), float("nan"), dtype=out_dtype, device=dev)
    for w in range(n_win):
        wy, wx = divmod(w, n_cols)
        on, _, ys, xs = _window_positions(wy, wx, (qh, qw_), (GH, GW), dev)  # queries on q's grid
        k_on, off, kys, kxs = _window_positions(wy, wx, window, k.shape[1:3], dev)
        flat = ys * GW + xs  # the queries' rows of rel_h / rel_w
        for b in range(B):
            qw = torch.zeros(1, qh * qw_, H, D, dtype=q.dtype, device=dev)  # padding queries: zeros, dropped
            kw_ = torch.empty(1, wh * ww, Hk, D, dtype=k.dtype, device=dev)
            vw = torch.empty(1, wh * ww, Hk, D, dtype=v.dtype, device=dev)
            qw[0, on] = q[b, ys, xs]
            kw_[0, k_on], vw[0, k_on] = k[b, kys, kxs], v[b, kys, kxs]
            kw_[0, off], vw[0, off] = kp, vp
            rh = rw = None
            if rel_h is not None:
                rh = torch.zeros(1, H, qh * qw_, wh, dtype=rel_h.dtype, device=dev)
                rw = torch.zeros(1, H, qh * qw_, ww, dtype=rel_w.dtype, device=dev)
                rh[0][:, on] = rel_h[b][:, flat]
                rw[0][:, on] = rel_w[b][:, flat]
            mask = None
            if block_mask is not None:
                sel = 0 if block_mask.shape[0] == 1 else b * n_win + w
                mask = block_mask[sel : sel + 1]
            o = attend(qw, kw_, vw, mask, rh, rw, None, scale=scale, block_size=block_size)
            out[b, ys, xs] = o[0, on].to(out_dtype)
    return out
