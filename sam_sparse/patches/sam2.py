"""SAM 2 (the sam2 package) as a patch family: which modules of a SAM2Base are attention layers of which
kind (the table is sam2_layers.py), the sparse classes that replace them (sam2_attention.py), and where
the prompt hooks go. The same interface as sam1.py; imported only for objects of the sam2 package.

patch_sam takes a SAM2Base (SAM2VideoPredictor is one), a SAM2ImagePredictor or a
SAM2AutomaticMaskGenerator (their model is patched), or the image encoder alone (ImageEncoder or its Hiera
trunk). A SAM2Base's video memory attention is patched too: its eight RoPEAttention modules (memory.self,
memory.cross; sam2_memory.py), the MemoryAttention around them, and the model's own class (sam2_video.py:
the memory call's structure recorded, the objects of a frame propagated as one batch).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import ImageEncoder
from sam2.modeling.memory_attention import MemoryAttention
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import RoPEAttention, TwoWayTransformer
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from torch import nn

from ..geometry import Grid, LayerGeometry
from ..sam2_layers import (EMBEDDING_GRID, ENCODER_PREFIX, IMAGE_SIZE, hiera_kind, hiera_layer, memory_attentions,
                           memory_layer)
from ..sam_layers import NOMINAL_DECODER_TOKENS, decoder_attentions, decoder_layer
from .sam2_attention import SPARSE_BLOCKS
from .sam2_encoder import GraphedImageEncoder
from .sam2_attention import SPARSE_CLASSES as _ATTENTION_CLASSES
from .sam2_memory import SparseMemoryAttention, SparseRoPEAttention
from .sam2_video import SPARSE_MODELS

SPARSE_CLASSES = {**_ATTENTION_CLASSES, RoPEAttention: SparseRoPEAttention}

NAME = "sam2"
SUPPORTED = ("sam2's SAM2Base (SAM2VideoPredictor too), SAM2ImagePredictor, SAM2AutomaticMaskGenerator, "
             "ImageEncoder or Hiera")

_PREFIX = {SAM2Base: "", ImageEncoder: ENCODER_PREFIX.rsplit(".", 1)[0] + ".", Hiera: ENCODER_PREFIX + "."}


def owns(obj) -> bool:
    return isinstance(obj, (SAM2ImagePredictor, SAM2AutomaticMaskGenerator, *_PREFIX))


def unwrap(obj) -> Tuple[nn.Module, str]:
    """The module patch_sam changes: a predictor's or generator's model, or obj itself."""
    if isinstance(obj, SAM2AutomaticMaskGenerator):
        obj = obj.predictor
    if isinstance(obj, SAM2ImagePredictor):
        obj = obj.model
    return obj, next(p for cls, p in _PREFIX.items() if isinstance(obj, cls))


def batches_objects(model: nn.Module) -> bool:
    """Whether propagate_in_video batches the objects of a frame unless told (patch_sam's batch_objects=None):
    yes, except on a SAM2VideoPredictorVOS, whose mask decoder, prompt and memory encoders SAM 2 compiles for
    one object at a time (dynamic=False, fullgraph=True): each new object count would compile them again,
    and dynamo stops a fullgraph function with an error at its ninth compile."""
    from sam2.sam2_video_predictor import SAM2VideoPredictorVOS

    return not isinstance(model, SAM2VideoPredictorVOS)


def is_video(model: nn.Module) -> bool:
    """Whether patch_sam's video options (batch_objects, graph_heads) apply: a SAM2VideoPredictor (VOS too)."""
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    return isinstance(model, SAM2VideoPredictor)


def refusal(model: nn.Module, policy, layers: List[LayerGeometry]) -> Optional[str]:
    """Why patch_sam cannot apply `policy` to `model` (the layers it would patch), or None.

    A SAM2VideoPredictorVOS compiles its memory attention with fullgraph=True for memories of any length; a
    sparse memory.cross mask depends on the memory's frames and pointer tokens, so the compiled function
    would be specialized (compiled again) per memory composition, and the ninth compile is an error."""
    from sam2.sam2_video_predictor import SAM2VideoPredictorVOS

    sparse = [g.name for g in layers if g.kind == "memory.cross" and not policy.keeps_all(g)]
    if isinstance(model, SAM2VideoPredictorVOS) and sparse:
        return (f"policy {policy.name!r} sparsifies the memory cross-attention ({sparse[0]}, ...), which "
                "SAM2VideoPredictorVOS (vos_optimized=True) compiles with fullgraph=True: its mask depends on "
                "each memory's frames and pointer tokens, so the compiled memory attention would be compiled "
                "again for every memory composition, past dynamo's limit of 8. Build the predictor with "
                "vos_optimized=False for a sparse memory policy, or keep memory.cross dense in the policy")
    return None


def image_grid(model: nn.Module) -> Grid:
    if isinstance(model, SAM2Base):
        return tuple(model.sam_prompt_encoder.image_embedding_size)
    return EMBEDDING_GRID


def hook_targets(model: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module], Optional[nn.Module]]:
    if not isinstance(model, SAM2Base) or not isinstance(model.sam_prompt_encoder, PromptEncoder):
        return None, None, None
    transformer = getattr(model.sam_mask_decoder, "transformer", None)
    return (model.sam_prompt_encoder, model.sam_mask_decoder,
            transformer if isinstance(transformer, TwoWayTransformer) else None)


def _trunk(model: nn.Module, notes: List[str]) -> Optional[Hiera]:
    trunk = model
    if isinstance(model, SAM2Base):
        trunk = model.image_encoder
    if isinstance(trunk, ImageEncoder):
        trunk = trunk.trunk
    if not isinstance(trunk, Hiera):
        notes.append(f"image encoder trunk {type(trunk).__name__} is not sam2's Hiera: left as is")
        return None
    return trunk


def find_layers(model: nn.Module, prefix: str, block_size: int) -> Tuple[List[Tuple[nn.Module, LayerGeometry]], List[str]]:
    """[(attention module, its LayerGeometry)] in forward order, and notes about parts left alone: the Hiera
    blocks (their grids from the model's image size), then the SAM 2 mask decoder's attentions."""
    notes: List[str] = []
    names = {id(m): prefix + n for n, m in model.named_modules()}
    found = []
    trunk = _trunk(model, notes)
    if trunk is not None:
        image_size = getattr(model, "image_size", IMAGE_SIZE)  # SAM2Base's; a bare encoder is taken at 1024
        stride = trunk.patch_embed.proj.stride
        grid = (image_size // stride[0], image_size // stride[1])
        stage, counts = 1, {}
        for i, block in enumerate(trunk.blocks):
            if i - 1 in trunk.stage_ends:
                stage += 1
            pooled = block.pool is not None
            kind = hiera_kind(block.window_size, pooled)
            index = counts.get(kind, 0)
            counts[kind] = index + 1
            found.append((block.attn, hiera_layer(names[id(block.attn)], block.attn.num_heads, grid,
                                                  block.window_size, pooled, index, stage, block_size)))
            if pooled:  # MaxPool2d, ceil_mode off: the grid after the block
                sh, sw = block.pool.stride if isinstance(block.pool.stride, tuple) else (block.pool.stride,) * 2
                grid = (grid[0] // sh, grid[1] // sw)
    if isinstance(model, SAM2Base):
        decoder_tf = getattr(model.sam_mask_decoder, "transformer", None)
        if not isinstance(decoder_tf, TwoWayTransformer):
            notes.append(f"mask decoder transformer {type(decoder_tf).__name__} is not a TwoWayTransformer: left as is")
        else:
            grid = image_grid(model)
            for path, kind, index in decoder_attentions(len(decoder_tf.layers)):
                attn = decoder_tf.get_submodule(path)
                found.append((attn, decoder_layer(names[id(attn)], kind, attn.num_heads, index,
                                                  NOMINAL_DECODER_TOKENS, grid, block_size)))
        found += _memory_layers(model, names, block_size, notes)
    return found, notes


def _memory_layers(model: SAM2Base, names, block_size: int, notes: List[str]) -> List[Tuple[nn.Module, LayerGeometry]]:
    """The memory attention's self- and cross-attentions, described on the model's frame grid (memory.cross
    at the nominal memory; calls carry their own)."""
    memory = getattr(model, "memory_attention", None)
    if memory is None:
        return []
    if not isinstance(memory, MemoryAttention):
        notes.append(f"memory attention {type(memory).__name__} is not sam2's MemoryAttention: left as is")
        return []
    found = []
    grid = image_grid(model)
    for path, kind, index in memory_attentions(len(memory.layers)):
        attn = memory.layers.get_submodule(path)
        if not isinstance(attn, RoPEAttention):
            notes.append(f"{names[id(attn)]}: {type(attn).__name__} is not a RoPEAttention: left as is")
            continue
        found.append((attn, memory_layer(names[id(attn)], kind, attn.num_heads, index, grid, block_size)))
    return found


def graphs_encoder(model: nn.Module) -> bool:
    """Whether patch_sam's graph_encoder applies: a video predictor (each frame's forward_image) or a model
    with sam2's ImageEncoder that is no video predictor (the encoder at batch 1: sam2_encoder.py)."""
    return is_video(model) or _image_encoder(model) is not None


def _image_encoder(model: nn.Module) -> Optional[ImageEncoder]:
    """The ImageEncoder of an image model (SAM2Base that is no video predictor, or the encoder itself)."""
    enc = model.image_encoder if isinstance(model, SAM2Base) else model
    return enc if type(enc) is ImageEncoder and not is_video(model) else None


def containers(model: nn.Module, patched) -> List[Tuple[nn.Module, type]]:
    """(module, sparse class) of the modules around patched attention whose class changes too: Hiera's
    windowed blocks (in-place windows), an image model's ImageEncoder (batch 1 from a CUDA graph:
    sam2_encoder.py), the MemoryAttention whose cross-attentions are all patched (packed memories), and the
    model (SPARSE_MODELS: memory calls recorded, batched propagation) when its memory attention is patched.
    patched: ids of the patched attention modules."""
    out = [(b, SPARSE_BLOCKS[type(b)]) for b in model.modules()
           if type(b) in SPARSE_BLOCKS and b.window_size > 0 and id(b.attn) in patched]
    enc = _image_encoder(model)
    if enc is not None and any(id(m) in patched for m in enc.modules()):
        out.append((enc, GraphedImageEncoder))
    memory = getattr(model, "memory_attention", None) if isinstance(model, SAM2Base) else None
    if memory is None or not any(id(m) in patched for m in memory.modules()):
        return out
    if type(memory) is MemoryAttention and all(id(layer.cross_attn_image) in patched for layer in memory.layers):
        out.append((memory, SparseMemoryAttention))
    if type(model) in SPARSE_MODELS:
        out.append((model, SPARSE_MODELS[type(model)]))
    return out


def image_predictor(model: SAM2Base, **kwargs) -> SAM2ImagePredictor:
    """sam2's SAM2ImagePredictor for `model` (kwargs: its mask_threshold, max_hole_area, ...), told the
    backbone feature sizes of the model's image size: sam2 1.1's predictor assumes 1024 px."""
    predictor = SAM2ImagePredictor(model, **kwargs)
    s = model.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor
