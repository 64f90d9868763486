"""SAM 2's attention layers: the one table of which module of a sam2 SAM2Base is which layer kind, with
the shapes each SAM 2.1 model type has (what sam_layers.py is for SAM). The patcher walks a real model
with hiera_layer; the policy tools use sam2_layer_geometries to describe a model that is not loaded.
Names and numbers only: no sam2 import.

The image encoder is Hiera (sam2/modeling/backbones/hieradet.py): a patch embedding of stride 4, then
four stages at 1/4, 1/8, 1/16 and 1/32 of the image (256, 128, 64 and 32 tokens a side at 1024 px).
Each block attends inside windows of its stage's size (window_spec) or, in the global blocks, over the
whole grid. The first block of stages 2-4 max-pools its queries by 2 (q_stride) and keeps the window
size of the stage before (Hiera lags the window by one block): its queries are a pooled window
(4x4 of an 8x8, 7x7 of a 14x14) attending to the full window of keys, the "encoder.pooled" kind.
Heads double at each stage with the width, so the head dim is the same in every block: 96 (t, s),
56 (b+), 72 (l).

The video memory attention (sam2/modeling/memory_attention.py) is the same in every SAM 2.1 model type:
4 layers, each a self-attention over the current frame's tokens (memory.self) and a cross-attention from
them to the memory (memory.cross: up to 7 memory frames of the same grid, the conditioning frames first,
then up to 64 object-pointer tokens), one head of dim 256, rotary position encoding. Its per-call
structure is a MemoryLayout; policies see NOMINAL_MEMORY (a full memory) where no call is at hand.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional, Tuple

from .geometry import Grid, LayerGeometry, MemoryLayout
from .sam_layers import DECODER_HEADS, NOMINAL_DECODER_TOKENS, decoder_attentions, decoder_layer

# Hiera per SAM 2.1 model type (sam2/configs/sam2.1/*.yaml; the SAM 2.0 configs have the same encoders):
# embed dim and heads of stage 1, blocks per stage, global-attention block indices, window per stage.
SAM2_ENCODERS = {
    "sam2.1_hiera_t": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_blocks=(5, 7, 9),
                           window_spec=(8, 4, 14, 7)),
    "sam2.1_hiera_s": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_blocks=(7, 10, 13),
                           window_spec=(8, 4, 14, 7)),
    "sam2.1_hiera_b+": dict(embed_dim=112, num_heads=2, stages=(2, 3, 16, 3), global_blocks=(12, 16, 20),
                            window_spec=(8, 4, 14, 7)),
    "sam2.1_hiera_l": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_blocks=(23, 33, 43),
                           window_spec=(8, 4, 16, 8)),
}
MODEL_TYPES = tuple(SAM2_ENCODERS)
# sam2's hydra config of each model type (a name inside the sam2 package, as build_sam2 takes it).
SAM2_CONFIGS = {t: f"configs/sam2.1/{t}.yaml" for t in MODEL_TYPES}

PATCH_STRIDE = 4  # Hiera's patch embedding: 4 px per stage-1 token
Q_STRIDE = 2  # query pooling at a stage change, per side
ENCODER_PREFIX = "image_encoder.trunk"
DECODER_PREFIX = "sam_mask_decoder.transformer"
IMAGE_SIZE = 1024
EMBEDDING_GRID = (64, 64)  # the mask decoder's image side at 1024 px (stride 16)

MEMORY_PREFIX = "memory_attention.layers"
MEMORY_LAYERS = 4  # memory attention layers (every SAM 2.1 config)
MEMORY_HEADS = 1  # heads of both attentions of a layer: head dim 256 (d_model 256)
# A full memory as SAM 2.1 builds it in tracking (num_maskmem = 7 frames, one of them the prompted
# frame; max_obj_ptrs_in_encoder = 16 pointers of 4 tokens each): what policies are described and
# rendered at when no call says otherwise.
NOMINAL_MEMORY_FRAMES = 7
NOMINAL_COND_FRAMES = 1
NOMINAL_POINTER_TOKENS = 64


def nominal_memory(grid: Grid = EMBEDDING_GRID) -> MemoryLayout:
    """The nominal memory on a frame grid: 7 frames, the first a conditioning frame, 64 pointer tokens."""
    frames = (True,) * NOMINAL_COND_FRAMES + (False,) * (NOMINAL_MEMORY_FRAMES - NOMINAL_COND_FRAMES)
    return MemoryLayout(frames, tuple(grid), NOMINAL_POINTER_TOKENS)


def memory_attentions(num_layers: int = MEMORY_LAYERS) -> List[Tuple[str, str, int]]:
    """(path under memory_attention.layers, kind, index among its kind) of the memory attention, in order."""
    out = []
    for i in range(num_layers):
        out += [(f"{i}.self_attn", "memory.self", i), (f"{i}.cross_attn_image", "memory.cross", i)]
    return out


def memory_layer(name: str, kind: str, num_heads: int, index: int, grid: Grid, block_size: int,
                 memory: Optional[MemoryLayout] = None) -> LayerGeometry:
    """A memory attention layer: memory.self over the frame grid, or memory.cross from the frame grid to
    `memory` (nominal_memory(grid) when None)."""
    n = grid[0] * grid[1]
    if kind == "memory.self":
        return LayerGeometry(name, kind, num_heads, n, n, tuple(grid), tuple(grid), block_size, None, index)
    memory = memory if memory is not None else nominal_memory(grid)
    return LayerGeometry(name, kind, num_heads, n, memory.seqlen, tuple(grid), None, block_size, None, index,
                         memory=memory)


def hiera_kind(window_size: int, pooled: bool) -> str:
    """The kind of a Hiera block: encoder.pooled (q pooled), encoder.window or encoder.global."""
    if pooled:
        return "encoder.pooled"
    return "encoder.window" if window_size > 0 else "encoder.global"


def hiera_layer(name: str, num_heads: int, grid: Grid, window_size: int, pooled: bool, index: int, stage: int,
                block_size: int) -> LayerGeometry:
    """A Hiera block's attention as a policy sees it.

    grid: the block's input token grid (rows, cols). window_size: its windows' side (0: global). pooled:
    its queries are max-pooled by Q_STRIDE. index: position among layers of its kind; stage: 1-4.
    Windowed kinds describe one window (keys the full window, queries the pooled one when pooled),
    global kinds the whole grid.
    """
    k_grid = (window_size, window_size) if window_size > 0 else tuple(grid)
    q_grid = (k_grid[0] // Q_STRIDE, k_grid[1] // Q_STRIDE) if pooled else k_grid
    kind = hiera_kind(window_size, pooled)
    return LayerGeometry(name, kind, num_heads, q_grid[0] * q_grid[1], k_grid[0] * k_grid[1], q_grid, k_grid,
                         block_size, None, index, stage)


def hiera_blocks(model_type: str, image_size: int = IMAGE_SIZE) -> List[Tuple[int, int, int, Grid, int, bool]]:
    """(block index, stage, heads, input grid, window size, pooled) of every Hiera block, as Hiera builds them."""
    enc = SAM2_ENCODERS[model_type]
    stage_ends = [sum(enc["stages"][: i + 1]) - 1 for i in range(len(enc["stages"]))]
    side = image_size // PATCH_STRIDE
    heads, stage, out = enc["num_heads"], 1, []
    for i in range(sum(enc["stages"])):
        window = enc["window_spec"][stage - 1]  # before the stage change below: the window lags a block
        window = 0 if i in enc["global_blocks"] else window
        pooled = i - 1 in stage_ends[:-1]
        if pooled:
            heads, stage = heads * 2, stage + 1
        out.append((i, stage, heads, (side, side), window, pooled))
        if pooled:
            side //= Q_STRIDE
    return out


def sam2_layer_geometries(
    model_type: str,
    block_size: int = 128,
    key_tile_fn: Optional[Callable[[LayerGeometry], Optional[Tuple[int, int]]]] = None,
    *,
    num_tokens: int = NOMINAL_DECODER_TOKENS,
    image_size: int = IMAGE_SIZE,
) -> List[LayerGeometry]:
    """LayerGeometry of every attention layer sam-sparse patches in a SAM 2.1 model: the Hiera blocks
    (image_encoder.trunk.blocks.{i}.attn), the mask decoder's seven attentions (sam_mask_decoder.transformer....,
    as SAM's), then the video memory attention's eight (memory_attention.layers.{i}.self_attn /
    .cross_attn_image, memory.cross at nominal_memory). key_tile_fn and num_tokens as sam_layer_geometries."""
    if model_type not in SAM2_ENCODERS:
        raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(SAM2_ENCODERS)}")
    layers, counts = [], {}
    for i, stage, heads, grid, window, pooled in hiera_blocks(model_type, image_size):
        kind = hiera_kind(window, pooled)
        layers.append(hiera_layer(f"{ENCODER_PREFIX}.blocks.{i}.attn", heads, grid, window, pooled,
                                  counts.get(kind, 0), stage, block_size))
        counts[kind] = counts.get(kind, 0) + 1
    side = image_size // 16
    for path, kind, index in decoder_attentions():
        layers.append(decoder_layer(f"{DECODER_PREFIX}.{path}", kind, DECODER_HEADS, index, num_tokens, (side, side),
                                    block_size))
    for path, kind, index in memory_attentions():
        layers.append(memory_layer(f"{MEMORY_PREFIX}.{path}", kind, MEMORY_HEADS, index, (side, side), block_size))
    if key_tile_fn is not None:
        layers = [replace(layer, key_tile=key_tile_fn(layer)) for layer in layers]
    return layers
