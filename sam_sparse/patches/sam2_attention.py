"""The sparse forwards that replace SAM 2's attention modules (the sam2 package): Hiera's
MultiScaleAttention and MultiScaleBlock, and the mask decoder's Attention.

The same mechanism as attention.py: a class swap plus one plain attribute, ``_sam_sparse`` (a LayerState);
the forwards call only sam_sparse.kernels. Shapes (B batch, nH heads, hd head dim, C = nH * hd):

- Hiera global blocks: x (B, H, W, C_in) -> (B, H', W', C), through block_sparse_attn; H', W' = H, W, or
  H / 2, W / 2 when the block pools its queries (q max-pooled by 2 after the qkv projection, as Hiera).
- Hiera windowed blocks (SparseMultiScaleBlock): the whole grid goes through window_attn, which reads
  each window in place: no pad / window_partition / window_unpartition / crop copies, and the qkv and
  output projections see H * W tokens instead of the padded grid's. A q-pooled block pools q over the
  grid (2 x 2 cells never straddle a window: windows and grids are even) and attends each pooled window
  to its full window (window_attn's q_window_size). A padded token is zero before the qkv projection, so
  its key and value are the projection's bias: the kernel uses those past the grid's edge.
  While an observer is set (calibration), or where the grid or window is odd, they run Hiera's own
  MultiScaleBlock.forward, whose partitioned windows reach SparseMultiScaleAttention.forward.
- Decoder: q (B, Nq, E), k, v (B, Nk, E) -> (B, Nq, E), SAM's TwoWayTransformer attention: the forward is
  attention.SparseDecoderAttention's (same attributes, same math; SAM 2's dropout is 0 in eval).
"""

from __future__ import annotations

from typing import Optional

import torch
from sam2.modeling.backbones.hieradet import MultiScaleAttention, MultiScaleBlock, do_pool
from sam2.modeling.sam.transformer import Attention as Sam2DecoderAttention

from ..kernels import block_sparse_attn, window_attn
from .attention import LayerState, SparseDecoderAttention


def _pools_by_two(pool) -> bool:
    """Whether `pool` is Hiera's MaxPool2d(2, 2): the only query pooling the in-place path reproduces."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (isinstance(pool, torch.nn.MaxPool2d) and pair(pool.kernel_size) == pair(pool.stride) == (2, 2)
            and pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1) and not pool.ceil_mode)


class SparseMultiScaleAttention(MultiScaleAttention):
    """sam2's Hiera MultiScaleAttention through sam_sparse's kernel. Same parameters.

    forward(x): x (B, H, W, C_in) is the whole grid (global blocks) or Hiera's partitioned windows
    (B * windows, w, w, C_in); returns (B, H', W', C_out) as the original. forward(x, window=w)
    (SparseMultiScaleBlock): x is the whole unpadded grid, attended window by window in place.
    """

    _sam_sparse: LayerState

    def forward(self, x: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
        if window is not None:
            return self.forward_windows(x, window)
        st = self._sam_sparse
        B, H, W, _ = x.shape
        geom = st.geometry
        layout = st.encoder_layout(x.device)
        tile = st.key_tile  # global blocks of a "tiles" policy, never with pooled queries
        if (layout is not None or tile is not None) and (H, W) != tuple(geom.k_grid):
            raise ValueError(f"{st.name}: input token grid {(H, W)} differs from the grid {geom.k_grid} its block "
                             f"mask was built for; patch the model at the image size it runs at")
        if tile is not None:
            th, tw = tile
            # raster (B, H, W, C) -> tiles (B, H/th, W/tw, th, tw, C); the qkv linear makes the copy.
            x = x.reshape(B, H // th, th, W // tw, tw, -1).transpose(2, 3)
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # each (B, N, nH, hd), a strided view
        if self.q_pool is not None:  # Hiera's own pooling, on this call's grid (or window)
            q = do_pool(q.reshape(B, H, W, -1), self.q_pool)
            H, W = q.shape[1:3]
            q = q.reshape(B, H * W, self.num_heads, -1)
        scale = q.shape[-1] ** -0.5  # SDPA's default, as Hiera calls it
        if st.observer is not None:
            st.observer(geom, None, q, k, None, None, None, scale)
        out = block_sparse_attn(q, k, v, layout, softmax_scale=scale, block_size=st.block_size)
        out = self.proj(out.reshape(B, H * W, -1))  # the kernel's output is contiguous (B, N, nH, hd)
        if tile is not None:
            return out.view(B, H // th, W // tw, th, tw, -1).transpose(2, 3).reshape(B, H, W, -1)
        return out.view(B, H, W, -1)

    def forward_windows(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """Hiera's windowed attention over the whole grid, without partitioning it.

        x: (B, H, W, C_in), the block's normalized tokens, not padded. Returns (B, H', W', C_out): what
        Hiera's pad -> window_partition -> attention (with q pooling) -> window_unpartition -> crop gives.
        """
        st = self._sam_sparse
        B, H, W, _ = x.shape
        nH = self.num_heads
        qkv = self.qkv(x).reshape(B, H, W, 3, nH, -1)
        q, k, v = qkv.unbind(3)  # each (B, H, W, nH, hd), a strided view
        q_window = None
        if self.q_pool is not None:
            # max over each 2 x 2 cell, as MaxPool2d(2, 2): one pass, contiguous (B, H/2, W/2, nH, hd)
            q = q.unflatten(1, (H // 2, 2)).unflatten(3, (W // 2, 2)).amax(dim=(2, 4))
            q_window = (window // 2, window // 2)
        k_pad = v_pad = None
        if self.qkv.bias is not None:
            _, k_pad, v_pad = self.qkv.bias.view(3, nH, -1).unbind(0)
        out = window_attn(
            q, k, v, (window, window), st.encoder_layout(x.device), q_window_size=q_window, k_pad=k_pad, v_pad=v_pad,
            softmax_scale=q.shape[-1] ** -0.5, block_size=st.block_size,
        )  # (B, H', W', nH, hd), contiguous
        return self.proj(out.view(*out.shape[:3], -1))


class SparseMultiScaleBlock(MultiScaleBlock):
    """sam2's Hiera MultiScaleBlock whose windowed attention runs in place (forward_windows).

    Same parameters and numbers as MultiScaleBlock.forward: shortcut (pooled projection at a stage change)
    + attn(norm1(x)), then + mlp(norm2(x)). Global blocks, windowed ones while an observer is set, and
    grids the in-place path does not reproduce (odd sides under q pooling) run MultiScaleBlock.forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = getattr(self.attn, "_sam_sparse", None)
        if self.window_size == 0 or st is None or st.observer is not None or not self._in_place(x):
            return super().forward(x)
        shortcut = x
        x = self.norm1(x)
        if self.dim != self.dim_out:
            shortcut = do_pool(self.proj(x), self.pool)
        x = shortcut + self.drop_path(self.attn(x, window=self.window_size))  # through __call__: hooks see it
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _in_place(self, x: torch.Tensor) -> bool:
        if self.attn.q_pool is None:
            return True
        # Pooling the grid equals pooling each window when 2 x 2 cells tile both (even sides everywhere).
        return (_pools_by_two(self.attn.q_pool) and self.window_size % 2 == 0 and x.shape[1] % 2 == 0
                and x.shape[2] % 2 == 0)


class SparseSam2DecoderAttention(Sam2DecoderAttention):
    """sam2's TwoWayTransformer Attention through block_sparse_attn: SAM's decoder forward, shared."""

    _sam_sparse: LayerState
    forward = SparseDecoderAttention.forward


# Original class -> sparse class. Only exact classes: RoPEAttention (memory attention) subclasses the
# decoder's Attention with its own forward.
SPARSE_CLASSES = {MultiScaleAttention: SparseMultiScaleAttention, Sam2DecoderAttention: SparseSam2DecoderAttention}
SPARSE_BLOCKS = {MultiScaleBlock: SparseMultiScaleBlock}
