"""segment-anything (SAM v1) as a patch family: which modules of a Sam are attention layers of which kind
(the table is sam_layers.py), the sparse classes that replace them (attention.py), and where the
prompt hooks go. patcher.py drives every family through the same few names:

    owns(obj) -> bool                              is this one of the family's objects
    unwrap(obj) -> (model, prefix)                 the module to patch and its canonical name prefix
    find_layers(model, prefix, block_size) -> (found, notes)   [(attention module, LayerGeometry)]
    hook_targets(model) -> (prompt encoder, mask decoder, two-way transformer), None where absent
    image_grid(model) -> (h, w)                    the mask decoder's image-embedding grid
    SPARSE_CLASSES, SPARSE_BLOCKS                  original class -> sparse class
    containers(model, patched) -> [(module, sparse class)]   modules around patched attention that change
                                                   class too (windowed encoder blocks, image encoders;
                                                   SAM 2's memory attention and video model)
    is_video(model), graphs_encoder(model), batches_objects(model), refusal(model, policy, layers)
                                                   which of patch_sam's options apply, their defaults, and
                                                   policies the model cannot run
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from ..geometry import Grid, LayerGeometry
from ..sam_layers import (
    DECODER_PREFIX,
    ENCODER_PREFIX,
    NOMINAL_DECODER_TOKENS,
    decoder_attentions,
    decoder_layer,
    encoder_kind,
    encoder_layer,
)
from .attention import SPARSE_BLOCKS, SPARSE_CLASSES, SPARSE_ENCODERS  # noqa: F401 (part of the family's interface)

NAME = "sam"
SUPPORTED = ("segment_anything's Sam (vit_b / vit_l / vit_h, or with another image encoder such as MobileSAM's "
             "TinyViT), ImageEncoderViT, MaskDecoder or TwoWayTransformer")

# Canonical names: policies see the same layer names whichever part of SAM was patched.
_PREFIX = {
    Sam: "",
    ImageEncoderViT: ENCODER_PREFIX + ".",
    MaskDecoder: DECODER_PREFIX.rsplit(".", 1)[0] + ".",
    TwoWayTransformer: DECODER_PREFIX + ".",
}


def owns(obj) -> bool:
    return isinstance(obj, tuple(_PREFIX))


def unwrap(obj) -> Tuple[nn.Module, str]:
    return obj, next(p for cls, p in _PREFIX.items() if isinstance(obj, cls))


def batches_objects(model: nn.Module) -> bool:
    """patch_sam's batch_objects=None: segment-anything has no video predictor, nothing to batch."""
    return False


def is_video(model: nn.Module) -> bool:
    """Whether patch_sam's video options (batch_objects, graph_heads) apply: segment-anything has no video."""
    return False


def graphs_encoder(model: nn.Module) -> bool:
    """Whether patch_sam's graph_encoder applies: not to segment-anything's models (sam_sparse.predictor's
    DevicePredictor graphs a SamPredictor's encoder)."""
    return False


def refusal(model: nn.Module, policy, layers) -> Optional[str]:
    """Why patch_sam cannot apply `policy` to `model`: every policy applies to segment-anything's models."""
    return None


def image_grid(model: nn.Module) -> Grid:
    if isinstance(model, Sam) and isinstance(model.prompt_encoder, PromptEncoder):
        return tuple(model.prompt_encoder.image_embedding_size)
    return (64, 64)  # SAM's, for the patch-time description only; calls use the real grid


def hook_targets(model: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module], Optional[nn.Module]]:
    prompt_encoder = mask_decoder = None
    if isinstance(model, Sam) and isinstance(model.prompt_encoder, PromptEncoder):
        prompt_encoder, mask_decoder = model.prompt_encoder, model.mask_decoder
    tf = {Sam: lambda m: m.mask_decoder.transformer, MaskDecoder: lambda m: m.transformer,
          TwoWayTransformer: lambda m: m}.get(type(model))
    transformer = tf(model) if tf is not None else None
    return prompt_encoder, mask_decoder, transformer if isinstance(transformer, TwoWayTransformer) else None


def find_layers(model: nn.Module, prefix: str, block_size: int) -> Tuple[List[Tuple[nn.Module, LayerGeometry]], List[str]]:
    """[(attention module, its LayerGeometry)] in forward order, and notes about parts left alone.

    Encoder layers get their geometry (raster order; the patcher applies a policy's tiles); decoder
    layers are described for NOMINAL_DECODER_TOKENS tokens (calls build their own)."""
    notes: List[str] = []
    encoder = decoder_tf = None
    if isinstance(model, Sam):
        encoder = model.image_encoder
        decoder_tf = getattr(model.mask_decoder, "transformer", None)
        if not isinstance(encoder, ImageEncoderViT):
            notes.append(f"image encoder {type(encoder).__name__} is not segment-anything's ImageEncoderViT: "
                         "left as is, only the mask decoder is patched")
            encoder = None
    elif isinstance(model, ImageEncoderViT):
        encoder = model
    elif isinstance(model, MaskDecoder):
        decoder_tf = model.transformer
    elif isinstance(model, TwoWayTransformer):
        decoder_tf = model
    if decoder_tf is not None and not isinstance(decoder_tf, TwoWayTransformer):
        notes.append(f"mask decoder transformer {type(decoder_tf).__name__} is not a TwoWayTransformer: left as is")
        decoder_tf = None
    names = {id(m): prefix + n for n, m in model.named_modules()}
    found = []
    if encoder is not None:
        stride = encoder.patch_embed.proj.stride
        image = (encoder.img_size // stride[0], encoder.img_size // stride[1])
        counts: dict = {}
        for block in encoder.blocks:
            kind = encoder_kind(block.window_size)
            grid = (block.window_size, block.window_size) if block.window_size > 0 else image
            index = counts.get(kind, 0)
            counts[kind] = index + 1
            found.append((block.attn, encoder_layer(names[id(block.attn)], kind, block.attn.num_heads, grid, index,
                                                    block_size)))
    if decoder_tf is not None:
        grid = image_grid(model)
        for path, kind, index in decoder_attentions(len(decoder_tf.layers)):
            attn = decoder_tf.get_submodule(path)
            found.append((attn, decoder_layer(names[id(attn)], kind, attn.num_heads, index, NOMINAL_DECODER_TOKENS,
                                              grid, block_size)))
    return found, notes


def containers(model: nn.Module, patched) -> List[Tuple[nn.Module, type]]:
    """(encoder block, SparseWindowBlock) for the windowed blocks whose attention is patched (ids in `patched`):
    their forward reads the windows in place; and (image encoder, SparseImageEncoderViT) where any of its
    attention is patched: its first call of an input signature compiles their kernels ahead."""
    out = [(b, SPARSE_BLOCKS[type(b)]) for b in model.modules()
           if type(b) in SPARSE_BLOCKS and b.window_size > 0 and id(b.attn) in patched]
    return out + [(e, SPARSE_ENCODERS[type(e)]) for e in model.modules()
                  if type(e) in SPARSE_ENCODERS and any(id(m) in patched for m in e.modules())]
