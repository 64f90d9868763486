"""SAM's attention layers: the one table of which module of segment-anything's Sam is which layer kind,
with the shapes each model type has. The patcher walks a real model with it; the policy tools use it
to describe a model that is not loaded (densities, renders, checks). Names and numbers only: no
segment_anything import, so policies can describe SAM without it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional, Tuple

from .geometry import Grid, LayerGeometry

# Image encoder per model type: depth, heads, global-attention block indices (segment_anything.build_sam).
SAM_ENCODERS = {
    "vit_b": {"depth": 12, "num_heads": 12, "global_blocks": (2, 5, 8, 11)},
    "vit_l": {"depth": 24, "num_heads": 16, "global_blocks": (5, 11, 17, 23)},
    "vit_h": {"depth": 32, "num_heads": 16, "global_blocks": (7, 15, 23, 31)},
    # MobileSAM: TinyViT is not SAM's ViT and is never patched; only SAM's own decoder has layers here.
    "mobile_sam": {"depth": 0, "num_heads": 0, "global_blocks": ()},
}
MODEL_TYPES = tuple(SAM_ENCODERS)  # vit_b, vit_l, vit_h, mobile_sam
SAM_WINDOW = 14  # encoder window size (tokens per side) of every released SAM
PATCH_SIZE = 16  # pixels per image token side

ENCODER_PREFIX = "image_encoder"
DECODER_PREFIX = "mask_decoder.transformer"
DECODER_HEADS = 8
DECODER_DEPTH = 2  # TwoWayTransformer blocks
# The attentions of one TwoWayAttentionBlock (attribute, kind), in forward order, then the final one.
DECODER_BLOCK_ATTENTIONS = (
    ("self_attn", "decoder.self"),
    ("cross_attn_token_to_image", "decoder.token_to_image"),
    ("cross_attn_image_to_token", "decoder.image_to_token"),
)
DECODER_FINAL_ATTENTION = ("final_attn_token_to_image", "decoder.final_token_to_image")
# Decoder tokens used to describe decoder layers before a call: 1 IoU token + 4 mask tokens + a point
# and its padding point. Masks are built per call for the actual count.
NOMINAL_DECODER_TOKENS = 7


def image_side(kind: str) -> Optional[str]:
    """Which side of a decoder attention holds the image embedding: "q", "k", or None (token self-attention)."""
    if kind == "decoder.image_to_token":
        return "q"
    return None if kind == "decoder.self" else "k"


def encoder_kind(window_size: int) -> str:
    """The kind of an image-encoder block with SAM's Block.window_size (0: global attention)."""
    return "encoder.window" if window_size > 0 else "encoder.global"


def encoder_layer(name: str, kind: str, num_heads: int, grid: Grid, index: int, block_size: int) -> LayerGeometry:
    """An encoder block's attention: image tokens on both sides, `grid` the whole image's or one window's."""
    n = grid[0] * grid[1]
    return LayerGeometry(name, kind, num_heads, n, n, grid, grid, block_size, None, index)


def decoder_layer(name: str, kind: str, num_heads: int, index: int, num_tokens: int, image_grid: Optional[Grid],
                  block_size: int, num_image_tokens: Optional[int] = None) -> LayerGeometry:
    """A mask-decoder attention for `num_tokens` prompt/output tokens and the image embedding.

    image_grid: the embedding's (rows, cols), or None when the image side is not a known grid (then
    num_image_tokens gives its length).
    """
    n_img = image_grid[0] * image_grid[1] if image_grid is not None else num_image_tokens
    side = image_side(kind)
    if side is None:
        return LayerGeometry(name, kind, num_heads, num_tokens, num_tokens, None, None, block_size, None, index)
    if side == "q":
        return LayerGeometry(name, kind, num_heads, n_img, num_tokens, image_grid, None, block_size, None, index)
    return LayerGeometry(name, kind, num_heads, num_tokens, n_img, None, image_grid, block_size, None, index)


def decoder_attentions(depth: int = DECODER_DEPTH) -> List[Tuple[str, str, int]]:
    """(module path inside the TwoWayTransformer, kind, layer index) of every decoder attention, in order."""
    out = []
    for j in range(depth):
        out += [(f"layers.{j}.{attr}", kind, j) for attr, kind in DECODER_BLOCK_ATTENTIONS]
    return out + [(DECODER_FINAL_ATTENTION[0], DECODER_FINAL_ATTENTION[1], 0)]


def sam_layer_geometries(
    model_type: str,
    block_size: int = 128,
    key_tile_fn: Optional[Callable[[LayerGeometry], Optional[Tuple[int, int]]]] = None,
    *,
    num_tokens: int = NOMINAL_DECODER_TOKENS,
    image_size: int = 1024,
) -> list:
    """LayerGeometry of every attention layer of an unpatched SAM, in forward order.

    model_type: vit_b | vit_l | vit_h | mobile_sam (decoder layers only: its encoder is not patched).
    key_tile_fn(layer) -> (th, tw) | None sets each layer's token order (e.g. ``policy.key_tile``);
    None keeps raster everywhere. num_tokens: prompt + output tokens in the mask decoder (5 output
    tokens + 2 for one point and its padding, or a box's two corners). Names follow segment-anything's
    modules (image_encoder.blocks.{i}.attn, mask_decoder.transformer.layers.{j}.self_attn /
    cross_attn_token_to_image / cross_attn_image_to_token, mask_decoder.transformer.final_attn_token_to_image).
    """
    if model_type not in SAM_ENCODERS:
        raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(SAM_ENCODERS)}")
    enc = SAM_ENCODERS[model_type]
    side = image_size // PATCH_SIZE
    layers, counts = [], {}
    for i in range(enc["depth"]):
        kind = encoder_kind(0 if i in enc["global_blocks"] else SAM_WINDOW)
        grid = (side, side) if kind == "encoder.global" else (SAM_WINDOW, SAM_WINDOW)
        layers.append(encoder_layer(f"{ENCODER_PREFIX}.blocks.{i}.attn", kind, enc["num_heads"], grid, counts.get(kind, 0), block_size))
        counts[kind] = counts.get(kind, 0) + 1
    for path, kind, index in decoder_attentions():
        layers.append(decoder_layer(f"{DECODER_PREFIX}.{path}", kind, DECODER_HEADS, index, num_tokens, (side, side), block_size))
    if key_tile_fn is not None:
        layers = [replace(layer, key_tile=key_tile_fn(layer)) for layer in layers]
    return layers
