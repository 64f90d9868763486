"""Building SAM models: Meta's ViT SAM (segment-anything's registry), MobileSAM (the vendored TinyViT
encoder with SAM's own prompt encoder and mask decoder) and SAM 2.1 (sam2's build_sam2 and its configs),
from released or converted checkpoints."""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Union

import torch
from torch import nn

from .checkpoints import (
    DTYPES,
    CheckpointError,
    check_model_type,
    infer_model_type,
    load_checkpoint,
    read_sparse_checkpoint,
)
from ..families import family_of
from ..patches import patch_sam
from ..policy import Policy, PolicyError
from ..sam2_layers import SAM2_CONFIGS
from .fetch import fetch_mobile_sam

PathLike = Union[str, os.PathLike]


@contextlib.contextmanager
def _params_on_meta():
    """Create parameters on the meta device (no memory, no init cost); buffers stay real.

    Non-persistent buffers (SAM's pixel_mean, TinyViT's bias index) are not in any state dict, so they
    must be computed for real; parameters come from load_state_dict(..., assign=True) afterwards.
    """
    orig = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _build_mobile_sam():
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from .tinyvit import TinyViT

    prompt_embed_dim, image_size = 256, 1024
    image_embedding_size = image_size // 16
    return Sam(
        image_encoder=TinyViT(
            img_size=image_size, in_chans=3, num_classes=1000, embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0,
            drop_rate=0.0, drop_path_rate=0.0, mbconv_expand_ratio=4.0, local_conv_size=3,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt_embed_dim,
            image_embedding_size=(image_embedding_size, image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_embed_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def _build_sam2(model_type: str):
    """SAM 2.1 as sam2's build_sam2 makes it for users (its post-processing options on), on the CPU."""
    try:
        from sam2.build_sam import build_sam2
    except ImportError as e:
        raise ValueError(f"model type {model_type} needs the sam2 package ({e}); install sam-sparse's sam2 extra "
                         "(README: SAM 2)") from None
    return build_sam2(SAM2_CONFIGS[model_type], None, device="cpu")


def build_model(model_type: str, empty: bool = False):
    """An unpatched model of `model_type` in eval mode (a segment_anything Sam, or a sam2 SAM2Base for the
    sam2.1_* types): random init, or with `empty` its parameters on the meta device, to be given real
    weights by load_weights(..., assign=True)."""
    check_model_type(model_type)
    if family_of(model_type) == "sam2":
        # sam2's builder moves the model to a device, which parameters on the meta device cannot follow:
        # SAM 2 gets its random init (seconds) even when real weights come next.
        return _build_sam2(model_type).eval()
    ctx = _params_on_meta() if empty else contextlib.nullcontext()
    with ctx:
        if model_type == "mobile_sam":
            model = _build_mobile_sam()
        else:
            from segment_anything import sam_model_registry

            model = sam_model_registry[model_type](checkpoint=None)
    return model.eval()


def load_weights(model, state_dict: dict, path, assign: bool) -> None:
    """load_state_dict(strict=True), with a CheckpointError naming the file and the keys that do not fit."""
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:
        missing = sorted(set(model.state_dict()) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(model.state_dict()))
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})")
        if not parts:
            first = str(e).strip().splitlines()
            parts.append(first[1].strip() if len(first) > 1 else first[0])
        raise CheckpointError(f"checkpoint {path}: does not fit the model: {'; '.join(parts)}") from None


def build_sam(model_type: Optional[str], checkpoint: Optional[PathLike] = None, device="cpu", dtype=None):
    """A segment_anything ``Sam`` (or, for the sam2.1_* types, a sam2 ``SAM2Base``) of `model_type` in eval mode.

    checkpoint: a state dict file (loaded with weights_only=True and strict=True; SAM 2's released files
        hold it under "model"); None = random init.
    For mobile_sam, ``checkpoint="default"`` fetches MobileSAM's released weights (fetch_mobile_sam).
    model_type None (with a checkpoint): read from the checkpoint's keys. dtype: None gives float32, whatever the
    file stores (segment-anything's SamPredictor and prompt encoder, and SAM 2's, compute in float32).
    """
    if model_type is not None or checkpoint is None:
        check_model_type(model_type)
    if checkpoint is None:
        model = build_model(model_type)
    else:
        if str(checkpoint) == "default" and model_type == "mobile_sam":
            checkpoint = fetch_mobile_sam()
        state_dict = load_checkpoint(checkpoint, model_type)
        model = build_model(model_type or infer_model_type(state_dict)[0], empty=True)
        load_weights(model, state_dict, checkpoint, assign=True)  # assign: the file's dtype, until the line below
    return model.to(device=device, dtype=torch.float32 if dtype is None else dtype).eval()


def build_video_predictor(model_type: Optional[str], checkpoint: Optional[PathLike] = None, device="cpu",
                          image_size: Optional[int] = None, vos_optimized: bool = False):
    """sam2's SAM2VideoPredictor of a SAM 2.1 `model_type` (build_sam2_video_predictor and its released
    config, post-processing on, as users get it), in eval mode on `device`; vos_optimized: sam2's
    SAM2VideoPredictorVOS (its encoders, decoder and memory attention under torch.compile).

    checkpoint: a SAM 2.1 state dict file (SAM 2's released {"model": ...} layout; weights_only=True,
        strict) for this model type; None = sam2's random init. model_type None (with a checkpoint): read from
        the checkpoint's keys. image_size: SAM 2's input side in px (None: the config's 1024; the memory grid
        is image_size / 16 a side).
    """
    if model_type is not None or checkpoint is None:
        check_model_type(model_type)
    state_dict = None if checkpoint is None else load_checkpoint(checkpoint, model_type)  # a bad file fails first
    if model_type is None:
        model_type = infer_model_type(state_dict)[0]
    if family_of(model_type) != "sam2":
        what = f"checkpoint {checkpoint} is for {model_type}, which" if checkpoint is not None else f"model type {model_type}"
        raise ValueError(f"{what} has no video predictor; choose a SAM 2.1 type ({', '.join(SAM2_CONFIGS)})")
    try:
        from sam2.build_sam import build_sam2_video_predictor
    except ImportError as e:
        raise ValueError(f"model type {model_type} needs the sam2 package ({e}); install sam-sparse's sam2 extra "
                         "(README: SAM 2)") from None
    extra = [f"++model.image_size={image_size}"] if image_size else []
    predictor = build_sam2_video_predictor(SAM2_CONFIGS[model_type], None, device="cpu", hydra_overrides_extra=extra,
                                           vos_optimized=vos_optimized)
    if state_dict is not None:
        load_weights(predictor, state_dict, checkpoint, assign=False)
    return predictor.to(device).eval()


def policy_from_manifest(manifest: dict, source: str = "<manifest>"):
    """The Policy stored (as YAML text) in a manifest; PolicyError (a ValueError) if it is invalid."""
    return Policy.from_yaml(manifest["policy"], source=source)


def load_sparse_sam(path: PathLike, device="cpu", dtype: Optional[torch.dtype] = torch.float32):
    """A patched ``Sam`` (``SAM2Base`` for SAM 2 types) from a converted checkpoint (sam_sparse.convert_checkpoint),
    ready for SamPredictor (SAM2ImagePredictor).

    dtype: the dtype to compute in. The default, float32, is what segment-anything's SamPredictor and
    prompt encoder need, whatever the file stores (a bf16 file is then upcast); None keeps the stored
    dtype (for running the image encoder in half precision yourself: docs/patching.md). The model
    type and the mask policy come from the file's manifest, never from its name.
    The model is built with its parameters on the meta device (no memory, no random init), given the
    stored weights (load_state_dict(strict=True, assign=True)), moved to `device` in the stored dtype,
    and patched with the manifest's policy (patching adds no parameters, so the order is free; patching
    last builds the block masks on `device`). The patch handle is ``model._sam_sparse_handle``.
    Raises CheckpointError (one line: the file and the problem) for a file it cannot use, its manifest's
    policy included.
    """
    manifest, state_dict = read_sparse_checkpoint(path)
    try:
        policy = policy_from_manifest(manifest, source=f"{path} (manifest policy)")
    except PolicyError as e:
        raise CheckpointError(f"{path}: its manifest's policy is invalid: {' '.join(str(e).split())}") from None
    model = build_model(manifest["model_type"], empty=True)
    load_weights(model, state_dict, path, assign=True)
    model = model.to(device=device, dtype=DTYPES[manifest["dtype"]] if dtype is None else dtype).eval()
    try:
        patch_sam(model, policy)
    except PolicyError as e:  # valid YAML, but not for this model (a head it does not have, ...)
        raise CheckpointError(f"{path}: its manifest's policy does not fit its {manifest['model_type']} model: "
                              f"{' '.join(str(e).split())}") from None
    return model
