"""Checkpoint files, both kinds: SAM state dicts as released (torch or safetensors, read with
weights_only=True and checked), and sam-sparse converted checkpoints (weights plus a manifest naming
the policy), read and written here.

Converted format. Manifest (all strings): format "sam-sparse", format_version, model_type, policy (the
policy as YAML text), policy_name, sam_sparse_version, source_sha256 (of the input file), source_name,
dtype (fp32/fp16/bf16). torch format: one file holding {"manifest": manifest, "state_dict": state_dict},
readable with torch.load(weights_only=True). safetensors format: the state dict, with the manifest as
header metadata.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from ..families import MODEL_TYPES
from ..sam2_layers import SAM2_ENCODERS

# (number of image-encoder blocks, embed dim) of Meta's ViT encoders, and of SAM 2's Hiera trunks.
_VIT_CONFIGS = {(12, 768): "vit_b", (24, 1024): "vit_l", (32, 1280): "vit_h"}
_HIERA_CONFIGS = {(sum(e["stages"]), e["embed_dim"]): t for t, e in SAM2_ENCODERS.items()}

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(MODEL_TYPES)}")


def infer_model_type(state_dict: dict) -> Tuple[Optional[str], str]:
    """(model type or None, what the keys look like in words) from key names and shapes."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(k.startswith("image_encoder.layers.") for k in keys):
        return "mobile_sam", "mobile_sam (TinyViT image encoder)"
    # (blocks prefix, patch-embedding key, (depth, dim) -> type, words): SAM 2's Hiera, then SAM's ViT.
    encoders = (("image_encoder.trunk.blocks.", "image_encoder.trunk.patch_embed.proj.weight", _HIERA_CONFIGS,
                 "SAM 2, Hiera", "/".join(SAM2_ENCODERS)),
                ("image_encoder.blocks.", "image_encoder.patch_embed.proj.weight", _VIT_CONFIGS, "SAM ViT",
                 "vit_b/vit_l/vit_h"))
    for prefix, proj_key, table, words, accepted in encoders:
        blocks = {int(k[len(prefix):].split(".")[0]) for k in keys
                  if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        proj = state_dict.get(proj_key)
        if blocks and isinstance(proj, torch.Tensor):
            depth, dim = max(blocks) + 1, proj.shape[0]
            name = table.get((depth, dim))
            if name:
                return name, f"{name} ({words} with {depth} blocks, embed dim {dim})"
            return None, f"a {words} with {depth} blocks and embed dim {dim}, which is none of {accepted}"
    if any(k.startswith(("image_encoder.", "mask_decoder.", "prompt_encoder.")) for k in keys):
        return None, "a partial SAM state dict (no image-encoder blocks)"
    sample = ", ".join(repr(k) for k in keys[:3]) or "no keys"
    return None, f"something else (keys like {sample})"


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _read_state(path: Path):
    """Load any torch or safetensors file into Python objects, or raise CheckpointError."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory, not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path}: is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(path, head, size):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: damaged safetensors file ({_first_line(e)})") from None
    torch_like = head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")  # zip archive or pickle
    try:
        # A file object, not the path: torch.load would go by a ".safetensors" name instead of the bytes.
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for bad bytes; all mean "unreadable"
        if not torch_like:
            raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint (starts with {head[:8]!r})") from None
        if isinstance(e, pickle.UnpicklingError) and ("weights_only" in str(e) or "Weights only" in str(e)):
            raise CheckpointError(
                f"checkpoint {path}: holds Python objects besides tensors, which weights_only loading refuses; "
                "save a plain state dict (torch.save(model.state_dict(), path))"
            ) from None
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt torch file ({size} bytes; {_first_line(e)})") from None


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        return _looks_like_safetensors(path, f.read(16), path.stat().st_size)


def _looks_like_safetensors(path: Path, head: bytes, size: int) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header (by content, not name)."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < size and head[8:9] == b"{"


def _safetensors_metadata(path: Path) -> dict:
    """The string metadata in a safetensors file's header (a converted file's manifest); {} when none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message, for one-line errors."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0].split(". ")[0][:160]


def load_checkpoint(path: PathLike, model_type: Optional[str] = None) -> dict:
    """A SAM state dict from `path` (torch file via weights_only=True, or safetensors), checked.

    A dict wrapping the state dict under "model" (SAM 2's released layout) or "state_dict" is unwrapped. With model_type, the
    keys must look like that architecture. Every problem raises CheckpointError with a one-line message
    naming the file: missing, empty, truncated/corrupt, not a torch file, not a state dict, a sam-sparse
    converted file, or the wrong architecture (saying which model type the keys look like).
    """
    if model_type is not None:
        check_model_type(model_type)
    path = Path(path)
    obj = _read_state(path)
    converted = isinstance(obj, dict) and "manifest" in obj and "state_dict" in obj
    if converted or (_tensor_dict(obj) and _is_safetensors(path)
                     and _safetensors_metadata(path).get("format") == FORMAT_NAME):
        raise CheckpointError(
            f"checkpoint {path}: is a sam-sparse converted checkpoint; load it with load_sparse_sam "
            "(CLI: segment, verify and amg take it as --sparse-checkpoint), or give the released checkpoint it came "
            "from"
        )
    if isinstance(obj, dict) and not _tensor_dict(obj):
        for key in ("model", "state_dict"):
            if _tensor_dict(obj.get(key)):
                obj = obj[key]
                break
    if not _tensor_dict(obj):
        what = f"a {type(obj).__name__}" + (f" with keys {list(obj)[:3]}" if isinstance(obj, dict) else "")
        raise CheckpointError(f"checkpoint {path}: is not a state dict (a dict of name -> tensor); it holds {what}")
    found, described = infer_model_type(obj)
    if found is None:
        raise CheckpointError(f"checkpoint {path}: is not a SAM checkpoint: its keys look like {described}")
    if model_type is not None and found != model_type:
        raise CheckpointError(
            f"checkpoint {path}: is for {described}, not {model_type}; pass --model-type {found}"
        )
    return obj


# ---------------------------------------------------------------------------------------------------
# Converted checkpoints
# ---------------------------------------------------------------------------------------------------

FORMAT_NAME = "sam-sparse"
FORMAT_VERSION = 1
FORMATS = ("torch", "safetensors")
MANIFEST_FIELDS = ("model_type", "policy", "sam_sparse_version", "source_sha256", "dtype")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def write_sparse_checkpoint(path: Path, manifest: Dict[str, str], state_dict: Dict[str, torch.Tensor], fmt: str) -> None:
    """Write one converted checkpoint, not atomically: callers write to a temporary path and rename."""
    if fmt == "torch":
        torch.save({"manifest": dict(manifest), "state_dict": state_dict}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path), metadata=dict(manifest))
    else:
        raise ValueError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")


def read_sparse_checkpoint(path: PathLike) -> Tuple[dict, dict]:
    """(manifest, state_dict) of a converted checkpoint (torch or safetensors format), checked."""
    path = Path(path)
    obj = _read_state(path)
    if _tensor_dict(obj) and _is_safetensors(path):  # the manifest is in the header's metadata
        manifest, state_dict = _safetensors_metadata(path), obj
    elif isinstance(obj, dict) and isinstance(obj.get("manifest"), dict) and _tensor_dict(obj.get("state_dict")):
        manifest, state_dict = dict(obj["manifest"]), obj["state_dict"]
    else:
        raise CheckpointError(
            f"checkpoint {path}: is not a sam-sparse converted checkpoint (no manifest); "
            "convert it first with `sam-sparse convert`, or load it with build_sam (CLI: --checkpoint)"
        )
    if manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"checkpoint {path}: has no sam-sparse manifest; convert it first with `sam-sparse convert`, "
            "or load it with build_sam (CLI: --checkpoint)"
        )
    missing = [k for k in MANIFEST_FIELDS if not manifest.get(k)]
    if missing:
        raise CheckpointError(f"checkpoint {path}: its manifest lacks {', '.join(missing)}")
    if str(manifest.get("format_version")) != str(FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {path}: manifest format_version {manifest.get('format_version')!r}; "
            f"this sam-sparse reads version {FORMAT_VERSION}"
        )
    if manifest["model_type"] not in MODEL_TYPES:
        raise CheckpointError(f"checkpoint {path}: manifest model_type {manifest['model_type']!r} is unknown")
    if manifest["dtype"] not in DTYPES:
        raise CheckpointError(f"checkpoint {path}: manifest dtype {manifest['dtype']!r} is not one of {', '.join(DTYPES)}")
    found, described = infer_model_type(state_dict)
    if found != manifest["model_type"]:
        raise CheckpointError(
            f"checkpoint {path}: manifest says {manifest['model_type']} but the weights look like {described}"
        )
    return manifest, state_dict
