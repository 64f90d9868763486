"""The sparse forwards that replace SAM's attention modules.

patch_sam swaps a module's class (``module.__class__ = SparseEncoderAttention``) and attaches one
plain attribute, ``module._sam_sparse`` (a LayerState). Parameters, buffers, their names and the
module's identity are untouched, so state_dict is the same before, during and after patching, and
``restore()`` is a class swap back. The forwards call only ``sam_sparse.kernels.block_sparse_attn``:
nothing here knows about Triton.

Shapes (B batch, N = H * W tokens, nH heads, hd head dim, C = nH * hd):
- encoder: x (B, H, W, C) -> (B, H, W, C). The windowed blocks' class is swapped too
  (SparseWindowBlock): their attention runs on the whole token grid through window_attn, which reads
  each window in place, so SAM's pad / partition / unpartition / crop copies are gone and the qkv and
  output projections see H * W tokens instead of the padded grid's. While an observer is set (calibration)
  they run SAM's own Block.forward, whose partitioned windows reach SparseEncoderAttention.forward.
- decoder: q (B, Nq, E), k, v (B, Nk, E) -> (B, Nq, E); B is the number of prompts.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as EncoderAttention
from segment_anything.modeling.image_encoder import Block as EncoderBlock
from segment_anything.modeling.image_encoder import ImageEncoderViT
from segment_anything.modeling.transformer import Attention as DecoderAttention

from ..geometry import LayerGeometry, Prompts
from ..kernels import BlockLayout, block_sparse_attn, window_attn
from ..sam_layers import image_side
from .first_call import compile_ahead_once

Grid = Tuple[int, int]


class PromptContext:
    """What the decoder attentions of one patched model need from the current call, per thread.

    grid: (h, w) of the image embedding fed to the TwoWayTransformer (recorded by a pre-hook), else the
        grid given at patch time.
    prompts: the current prompts in token-grid units (recorded from the PromptEncoder call), or None.

    The hooks are this object's methods, not closures: a deepcopy of the model copies them bound to the
    copy's own context (which its layers share), and the model pickles. The per-call values live in a
    threading.local, so two threads running one model never see each other's prompts.
    """

    def __init__(self, grid: Optional[Grid] = None):
        self.default_grid = grid
        self._local = threading.local()

    def __getstate__(self):
        return {"default_grid": self.default_grid}  # per-call state is not part of the model

    def __setstate__(self, state):
        self.default_grid = state["default_grid"]
        self._local = threading.local()

    @property
    def grid(self) -> Optional[Grid]:
        return getattr(self._local, "grid", self.default_grid)

    @property
    def prompts(self) -> Optional[Prompts]:
        # Converted on first use: the hooks keep the call's arguments, and only a policy that reads the
        # prompts pays for the conversion (about ten small kernels a predict call would launch for nothing).
        call = getattr(self._local, "call", None)
        if call is not None:
            self._local.prompts = prompts_from_call(*call)
            self._local.call = None
        return getattr(self._local, "prompts", None)

    def on_prompts(self, prompt_encoder, args, kwargs) -> None:
        """PromptEncoder forward pre-hook: record this call's points / boxes."""
        self._local.call, self._local.prompts = (prompt_encoder, args, kwargs), None

    def record(self, prompt_encoder, points, boxes) -> None:
        """What on_prompts records, for code that computes the prompt embeddings without calling the
        PromptEncoder (maskgen's adapter): points (coords, labels) or None, boxes (B, 4) or None."""
        self._local.call, self._local.prompts = (prompt_encoder, (), {"points": points, "boxes": boxes}), None

    def on_image(self, _transformer, args, kwargs) -> None:
        """TwoWayTransformer forward pre-hook: record the image-embedding grid."""
        emb = args[0] if args else kwargs["image_embedding"]
        self._local.grid = tuple(emb.shape[-2:])

    def forget(self, *_) -> None:
        """MaskDecoder forward hook: the prompts belonged to that call only."""
        self._local.call = self._local.prompts = None


def prompts_from_call(pe, args, kwargs) -> Prompts:
    """The PromptEncoder's (points, boxes) in image-token units (pixels at input size / patch size)."""
    call = dict(zip(("points", "boxes", "masks"), args), **kwargs)
    sy = pe.image_embedding_size[0] / pe.input_image_size[0]
    sx = pe.image_embedding_size[1] / pe.input_image_size[1]

    def scaled(xy: torch.Tensor) -> torch.Tensor:  # (..., 2k) as x, y, x, y...; python scalars: no host-device copy
        out = xy.detach().float().clone()
        out[..., 0::2] *= sx
        out[..., 1::2] *= sy
        return out

    points = boxes = None
    if call.get("points") is not None:
        coords, labels = call["points"]
        points = scaled(coords)
        # SAM 2 passes a box as two points labelled 2 and 3 (its corners): make them the row's box. No
        # host sync: rows without such points get a NaN box, which selects nothing.
        corner0, corner1 = labels == 2, labels == 3
        first = lambda m: torch.gather(points, 1, m.int().argmax(1)[:, None, None].expand(-1, 1, 2))[:, 0]  # noqa: E731
        corners = torch.cat([first(corner0), first(corner1)], dim=-1)  # (B, 4) as x0, y0, x1, y1
        boxes = torch.where((corner0.any(1) & corner1.any(1))[:, None], corners, float("nan"))
        # Label -1 marks a padding point (SAM ignores it): NaN makes policies ignore it, and box corners too.
        points = points.masked_fill(((labels == -1) | corner0 | corner1)[..., None], float("nan"))
    if call.get("boxes") is not None:
        boxes = scaled(call["boxes"].reshape(-1, 4))
    return Prompts(points=points, boxes=boxes)


@dataclass(eq=False)
class LayerState:
    """Per-module patch state. A plain attribute, never a buffer: state_dict stays the original's.

    geometry: the layer as the policy sees it. Encoder layers have one fixed geometry; for decoder
        layers it is a template whose token counts and grids are filled in per call.
    layouts: BlockLayouts of the prompt-free masks, keyed by (device,) for encoder layers and
        (seqlen_q, seqlen_k, grid, device) for decoder layers, built once (patch time for the model's
        device); None = dense. Per-prompt masks are built per call, on the device, with no host sync.
    tables: tensors a forward derives from the module's own and keeps (memory attention's cos / sin RoPE
        tables), keyed by what they were made from.
    dropped: how many times a cached layout or table was let go (a CUDA graph that reads one must go too).
    """

    name: str
    geometry: LayerGeometry
    policy: Any
    context: Optional[PromptContext] = None
    layouts: Dict[tuple, Optional[BlockLayout]] = field(default_factory=dict)
    needs_prompts: Dict[tuple, bool] = field(default_factory=dict)
    tables: Dict[tuple, Any] = field(default_factory=dict)  # tensors derived from the module's own (RoPE tables)
    observer: Optional[Callable[..., None]] = None  # PatchHandle.observe: sees every call's kernel inputs
    dropped: int = 0

    def __getstate__(self):
        # A copy made inside observe() is not observed (and a lambda observer need not pickle).
        return {**self.__dict__, "observer": None}

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    @property
    def key_tile(self) -> Optional[Grid]:
        return self.geometry.key_tile

    # Under torch.compile the layouts are built inside the trace and kept nowhere: a lookup would make dynamo
    # guard on the cache's keys (a compile for every new entry) and a store is a side effect it cannot replay.

    def encoder_layout(self, device: torch.device) -> Optional[BlockLayout]:
        if torch.compiler.is_compiling():
            return _layout(self.policy.block_mask(self.geometry, None, device), self.block_size)
        key = (device,)
        if key not in self.layouts:
            self.layouts[key] = _layout(self.policy.block_mask(self.geometry, None, device), self.block_size)
        return self.layouts[key]

    def decoder_layout(self, seqlen_q: int, seqlen_k: int, batch: int, device: torch.device) -> Optional[BlockLayout]:
        ctx = self.context
        grid = ctx.grid if ctx is not None else None
        key = (seqlen_q, seqlen_k, grid, device)
        compiling = torch.compiler.is_compiling()
        if not compiling and key in self.layouts:
            return self.layouts[key]
        geom = decoder_geometry(self.geometry, seqlen_q, seqlen_k, grid)
        if compiling:
            needs_prompts = bool(self.policy.needs_prompts(geom))
        else:
            if key not in self.needs_prompts:
                self.needs_prompts[key] = bool(self.policy.needs_prompts(geom))
            needs_prompts = self.needs_prompts[key]
        if not needs_prompts:
            layout = _layout(self.policy.block_mask(geom, None, device), self.block_size)
            if not compiling:
                self.layouts[key] = layout
            return layout
        prompts = ctx.prompts if ctx is not None else None
        if prompts is not None and prompts.batch != batch:
            prompts = None  # not this call's prompts (e.g. the decoder was called on its own)
        return _layout(self.policy.block_mask(geom, prompts, device), self.block_size)


def _layout(mask: Optional[torch.Tensor], block_size: int) -> Optional[BlockLayout]:
    return None if mask is None else BlockLayout.from_mask(mask, block_size)


def _image_grid(n: int, grid: Optional[Grid]) -> Optional[Grid]:
    if grid is not None and grid[0] * grid[1] == n:
        return tuple(grid)
    side = math.isqrt(n)
    return (side, side) if side * side == n else None


def decoder_geometry(template: LayerGeometry, seqlen_q: int, seqlen_k: int, grid: Optional[Grid]) -> LayerGeometry:
    """The template's geometry for one call: token counts, and the image grid on the image side."""
    q_grid = k_grid = None
    side = image_side(template.kind)
    if side == "q":
        q_grid = _image_grid(seqlen_q, grid)
    elif side == "k":
        k_grid = _image_grid(seqlen_k, grid)
    return replace(template, seqlen_q=seqlen_q, seqlen_k=seqlen_k, q_grid=q_grid, k_grid=k_grid)


_INDEX: Dict[tuple, torch.Tensor] = {}


def _cached_index(key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A small index tensor that is a pure function of `key` (sizes and device): built once and reused
    by eager calls, where at batch 1 the tiny kernels that build it cost more than they compute."""
    if torch.compiler.is_compiling():  # traced: inductor folds it into the graph, no cache needed
        return build()
    if key not in _INDEX:
        # A normal tensor even when the first call runs under inference_mode: later calls may not.
        with torch.inference_mode(False):
            _INDEX[key] = build()
    return _INDEX[key]


def _rel_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    """SAM's relative-coordinate index, (q_size, k_size) int64."""
    return _cached_index(("rel", q_size, k_size, device), lambda: _build_rel_index(q_size, k_size, device))


def _build_rel_index(q_size: int, k_size: int, device: torch.device) -> torch.Tensor:
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    return ((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long()


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """segment-anything's get_rel_pos, the same numbers, with its index built on rel_pos's device.

    rel_pos: (L, hd). Returns (q_size, k_size, hd). SAM builds the index on the CPU; indexing a GPU
    tensor with it is a blocking host-to-device copy, i.e. a stream sync in every attention call.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:  # interpolate, as SAM does
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear")
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    return rel_pos[_rel_index(q_size, k_size, rel_pos.device)]


def rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: Grid, tile: Optional[Grid]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed rel-pos terms per query, without the N x N bias.

    q: (B, N, nH, hd), any strides, tokens in raster order (tile None) or grouped in th x tw tiles.
    rel_pos_h: (2*H - 1 or any length SAM interpolates, hd); rel_pos_w likewise for W.
    Returns rel_h (B, nH, N, H) and rel_w (B, nH, N, W), queries in q's token order, as views of
    (B, nH, H, N) / (B, nH, W, N) storage: the same numbers as the rel_h / rel_w einsums of SAM's
    add_decomposed_rel_pos (same get_rel_pos, same dtype).
    """
    H, W = hw
    B, N, nH, hd = q.shape
    Rh = get_rel_pos(H, H, rel_pos_h)  # (H query rows, H key rows, hd)
    Rw = get_rel_pos(W, W, rel_pos_w)
    if tile is None:
        rq = q.reshape(B, H, W, nH, hd)  # a view of the qkv projection
        rel_h = torch.einsum("byxnc,ykc->bnkyx", rq, Rh)
        rel_w = torch.einsum("byxnc,xkc->bnkyx", rq, Rw)
    else:
        # Tiled order: position = ((tile_row, tile_col), in_row, in_col); the query row is
        # tile_row * th + in_row, so split Rh's query axis the same way instead of gathering.
        th, tw = tile
        rq = q.reshape(B, H // th, W // tw, th, tw, nH, hd)
        rel_h = torch.einsum("bRCrcnd,Rrkd->bnkRCrc", rq, Rh.reshape(H // th, th, H, hd))
        rel_w = torch.einsum("bRCrcnd,Cckd->bnkRCrc", rq, Rw.reshape(W // tw, tw, W, hd))
    # One copy each into (B, nH, k, N) storage, handed over as a (B, nH, N, k) view: queries are then
    # contiguous, which is the layout the kernel loads coalesced. (einsum's own result is laid out by
    # its bmm over the query row / column, so some copy is needed whichever layout is asked for.)
    return rel_h.reshape(B, nH, H, N).transpose(-1, -2), rel_w.reshape(B, nH, W, N).transpose(-1, -2)


def _in_window_index(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n,) int64: each grid row's (or column's) position inside its window, i % window."""
    return _cached_index(("window", n, window, device), lambda: torch.arange(n, device=device) % window)


def window_rel_pos_terms(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, window: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SAM's decomposed rel-pos terms of windowed attention, for queries on the whole (unpadded) grid.

    q: (B, H, W, nH, hd), any strides. rel_pos_h / rel_pos_w: the block's tables (2 * window - 1, hd).
    Returns rel_h, rel_w (B, nH, H * W, window): the terms SAM's windowed add_decomposed_rel_pos computes
    for the query at grid (y, x), i.e. at (y % window, x % window) inside its window, raster order.
    The key axis is stored padded to a multiple of 8 (14 -> 16) and sliced: with 14 the einsum's
    matmul falls on cuBLAS's slow 2-byte-aligned kernels.
    """
    B, H, W, nH, hd = q.shape
    kp = -(-window // 8) * 8
    Rh = get_rel_pos(window, window, rel_pos_h)[_in_window_index(H, window, q.device)]  # (H, window, hd)
    Rw = get_rel_pos(window, window, rel_pos_w)[_in_window_index(W, window, q.device)]
    Rh = F.pad(Rh, (0, 0, 0, kp - window))
    Rw = F.pad(Rw, (0, 0, 0, kp - window))
    rel_h = torch.einsum("byxnc,ykc->bnkyx", q, Rh)
    rel_w = torch.einsum("byxnc,xkc->bnkyx", q, Rw)
    view = lambda t: t.reshape(B, nH, kp, H * W).transpose(-1, -2)[..., :window]  # noqa: E731
    return view(rel_h), view(rel_w)


class SparseEncoderAttention(EncoderAttention):
    """segment-anything's image-encoder Attention, through block_sparse_attn. Same parameters.

    forward: x (B, H, W, C) -> (B, H, W, C), as the original; with window=w (SparseWindowBlock) x is the
    whole unpadded grid and attention runs inside w x w windows (forward_windows). The rel-pos terms go to the kernel as
    rel_h (B, nH, N, H) / rel_w (B, nH, N, W); no (N, N) tensor is formed. With a tiled token order
    (global blocks of "tiles" policies) tokens are permuted into tiles once before the qkv
    projection and back once after the output projection (both are per-token, so they commute).
    """

    _sam_sparse: LayerState

    def forward(self, x: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
        if window is not None:  # SparseWindowBlock: the whole grid, attended window by window
            return self.forward_windows(x, window)
        st = self._sam_sparse
        B, H, W, C = x.shape
        N = H * W
        geom = st.geometry
        layout = st.encoder_layout(x.device)
        tile = st.key_tile
        if (layout is not None or tile is not None) and (geom.q_grid is not None) and (H, W) != tuple(geom.q_grid):
            raise ValueError(
                f"{st.name}: input token grid {(H, W)} differs from the grid {geom.q_grid} its block mask "
                f"was built for; patch the model at the image size it runs at"
            )
        if tile is not None:
            th, tw = tile
            # raster (B, H, W, C) -> tiles (B, H/th, W/tw, th, tw, C); the qkv linear makes the copy.
            x = x.reshape(B, H // th, th, W // tw, tw, C).transpose(2, 3)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, -1)
        q, k, v = qkv.unbind(2)  # each (B, N, nH, hd), a strided view: no copy
        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, (H, W), tile)
        if st.observer is not None:
            st.observer(geom, None, q, k, rel_h, rel_w, tile if rel_h is not None else None, self.scale)
        out = block_sparse_attn(
            q, k, v, layout,
            rel_h=rel_h, rel_w=rel_w, key_tile=tile if rel_h is not None else None,
            softmax_scale=self.scale, block_size=st.block_size,
        )  # (B, N, nH, hd), contiguous
        out = self.proj(out.reshape(B, N, C))  # a view: the kernel returns contiguous (B, N, nH, hd)
        if tile is not None:
            return out.view(B, H // th, W // tw, th, tw, C).transpose(2, 3).reshape(B, H, W, C)
        return out.view(B, H, W, C)

    def forward_windows(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """SAM's windowed attention over the whole grid, without partitioning it.

        x: (B, H, W, C), the block's normalized tokens, not padded. Returns (B, H, W, C): what SAM's
        pad -> window_partition -> attention -> window_unpartition -> crop gives. A padded token is zero
        before the qkv projection, so its key and value are the projection's bias: the kernel uses
        those for the keys a window has beyond the grid.
        """
        st = self._sam_sparse
        B, H, W, C = x.shape
        nH = self.num_heads
        qkv = self.qkv(x).reshape(B, H, W, 3, nH, -1)
        q, k, v = qkv.unbind(3)  # each (B, H, W, nH, hd), a strided view
        pad = self.qkv.bias.view(3, nH, -1) if self.qkv.bias is not None else None
        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h, rel_w = window_rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, window)
        out = window_attn(
            q, k, v, (window, window), st.encoder_layout(x.device),
            k_pad=None if pad is None else pad[1], v_pad=None if pad is None else pad[2],
            rel_h=rel_h, rel_w=rel_w, softmax_scale=self.scale, block_size=st.block_size,
        )  # (B, H, W, nH, hd), contiguous
        return self.proj(out.view(B, H, W, C))


class SparseWindowBlock(EncoderBlock):
    """segment-anything's encoder Block whose windowed attention runs in place (forward_windows).

    Same parameters and numbers as Block.forward: x + attn(norm1(x)), then x + mlp(norm2(x)). Global
    blocks, and windowed ones while an observer is set, run Block.forward unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = getattr(self.attn, "_sam_sparse", None)
        if self.window_size == 0 or st is None or st.observer is not None:
            return super().forward(x)
        x = x + self.attn(self.norm1(x), window=self.window_size)  # through __call__: module hooks see it
        return x + self.mlp(self.norm2(x))


class SparseImageEncoderViT(ImageEncoderViT):
    """segment-anything's image encoder whose first eager call of an input signature compiles its patched
    attentions' kernels ahead (first_call.py), then runs ImageEncoderViT.forward: x (B, 3, H, W) -> (B, 256,
    H / 16, W / 16), the same values. Its one plain attribute, ``_sam_sparse_memory``, is the handle's
    MemoryContext (handle.memory.compile_ahead switches the pass)."""

    _sam_sparse_memory = None  # set by PatchHandle.enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compile_ahead_once(self, self._sam_sparse_memory, x, lambda: ImageEncoderViT.forward(self, x))
        return super().forward(x)


class SparseDecoderAttention(DecoderAttention):
    """segment-anything's TwoWayTransformer Attention, through block_sparse_attn. Same parameters.

    forward: q (B, Nq, E), k (B, Nk, E), v (B, Nk, E) -> (B, Nq, E). Heads are separated as views
    (B, N, nH, d) of the projections, with d = E / downsample_rate / nH (16 for SAM's cross
    attentions, 32 for its self attention); scale d ** -0.5 as SAM.
    """

    _sam_sparse: LayerState

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        st = self._sam_sparse
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        B, Nq, D = q.shape
        Nk = k.shape[1]
        nH = self.num_heads
        layout = st.decoder_layout(Nq, Nk, B, q.device)
        if st.observer is not None:
            ctx = st.context
            grid = ctx.grid if ctx is not None else None
            prompts = ctx.prompts if ctx is not None and ctx.prompts is not None and ctx.prompts.batch == B else None
            st.observer(decoder_geometry(st.geometry, Nq, Nk, grid), prompts, q.reshape(B, Nq, nH, D // nH),
                        k.reshape(B, Nk, nH, D // nH), None, None, None, 1.0 / math.sqrt(D // nH))
        out = block_sparse_attn(
            q.reshape(B, Nq, nH, D // nH), k.reshape(B, Nk, nH, D // nH), v.reshape(B, Nk, nH, D // nH), layout,
            softmax_scale=1.0 / math.sqrt(D // nH), block_size=st.block_size,
        )
        return self.out_proj(out.reshape(B, Nq, D))


# Original class -> sparse class. Only exact classes: a subclass may have its own forward.
SPARSE_CLASSES = {EncoderAttention: SparseEncoderAttention, DecoderAttention: SparseDecoderAttention}
# Encoder blocks whose windowed attention is patched get this class as well (PatchHandle.enable).
SPARSE_BLOCKS = {EncoderBlock: SparseWindowBlock}
# Image encoders whose patched attention compiles ahead on a first call get this class (PatchHandle.enable).
SPARSE_ENCODERS = {ImageEncoderViT: SparseImageEncoderViT}
