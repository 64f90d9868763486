"""Convert a SAM checkpoint into a sam-sparse checkpoint: the weights plus a manifest naming the policy.

    result = convert_checkpoint("sam_vit_b.pth", "vit_b_sparse.pt", policy="NAME", model_type="vit_b")
    model = load_sparse_sam("vit_b_sparse.pt")      # patched Sam, ready for SamPredictor

The format (manifest fields, torch and safetensors layouts) is defined, read and written in
models/checkpoints.py.

Safety: the input is only read. The output is written to a temporary file in its own folder, reloaded
with load_sparse_sam and compared with what was meant to be written, and only then renamed over OUT
(os.replace), so OUT is either the previous file or a complete, checked new one; the temporary file
is removed on any error or interrupt.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

from . import __version__
from .files import atomic_path, refuse_inputs, same_file
from .models import build_model, load_sparse_sam, load_weights
from .models.checkpoints import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    CheckpointError,
    infer_model_type,
    load_checkpoint,
    write_sparse_checkpoint,
)
from .models.fetch import sha256_file

PathLike = Union[str, os.PathLike]
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")


def format_for(out: Path, fmt: Optional[str]) -> str:
    """The file format to write: `fmt`, or the one OUT's name says (.safetensors, else torch).

    A name that says one format and an explicit `fmt` that says the other is an error: the file would
    be read by that name elsewhere."""
    named = "safetensors" if out.suffix.lower() == ".safetensors" else (
        "torch" if out.suffix.lower() in TORCH_SUFFIXES else None)
    if fmt is None:
        return named or "torch"
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if named is not None and named != fmt:
        raise ValueError(f"output {out}: the name says {named} but the format asked for is {fmt}; "
                         f"name it *{'.safetensors' if fmt == 'safetensors' else '.pt'} or leave the format out")
    return fmt


@dataclass
class ConvertResult:
    """What convert_checkpoint wrote. density_by_kind: mean block density per layer kind (None: per-prompt)."""

    out: Path
    manifest: Dict[str, str]
    modules_patched: int
    density_by_kind: Dict[str, Optional[float]]
    parameters: int
    in_bytes: int
    out_bytes: int
    notes: List[str] = field(default_factory=list)

    def summary(self) -> str:
        m = self.manifest
        lines = [
            f"wrote {self.out} ({_size(self.out_bytes)}; input {_size(self.in_bytes)})",
            f"  model {m['model_type']}, {self.parameters / 1e6:.1f}M parameters, dtype {m['dtype']}, "
            f"policy {m['policy_name']!r}, sam-sparse {m['sam_sparse_version']}",
            f"  source sha256 {m['source_sha256']}",
            f"  {self.modules_patched} attention modules patched; block density by layer kind:",
        ]
        for kind, dens in self.density_by_kind.items():
            lines.append(f"    {kind:30s} {'per-prompt' if dens is None else f'{dens:.3f}'}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def policy_yaml(policy) -> str:
    """The policy as YAML text, for the manifest."""
    return policy.to_yaml()


def check_paths(src: Path, out: Path, force: bool) -> None:
    """Refuse to write over the input (ever) or over an existing OUT (unless force)."""
    if out.exists() and out.is_dir():
        raise ValueError(f"output {out}: is a directory; give a file name")
    if same_file(out, src):
        raise ValueError(f"output {out}: is the input checkpoint; choose another name (convert never writes over its input)")
    if out.exists() and not force:
        raise ValueError(f"output {out}: already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"output {out}: folder {out.parent} does not exist")


def _density_by_kind(report) -> Dict[str, Optional[float]]:
    by_kind: Dict[str, list] = OrderedDict()
    for r in report:
        by_kind.setdefault(r.kind, []).append(r.density)
    return OrderedDict(
        (k, None if any(d is None for d in ds) else sum(ds) / len(ds)) for k, ds in by_kind.items()
    )


def convert_checkpoint(
    checkpoint: PathLike,
    out: PathLike,
    policy="dense",
    *,
    model_type: Optional[str] = None,
    fmt: Optional[str] = None,
    dtype: str = "fp32",
    force: bool = False,
    device="cpu",
    progress: Optional[Callable[[str], None]] = None,
) -> ConvertResult:
    """Convert `checkpoint` (a SAM state dict) into a sam-sparse checkpoint at `out`.

    policy: a built-in policy name, a policy YAML path or a Policy object. model_type: checked against
    the checkpoint's keys; None infers it. fmt: "torch" or "safetensors"; None: from `out`'s name
    (.safetensors, else torch); one that contradicts the name is a ValueError. dtype: "fp32", "fp16" or "bf16".
    force: replace an existing `out` (never the input). device: where the written file is reloaded
    and checked. progress: called with the name of each step.
    Raises CheckpointError for a bad input, the policy's PolicyError for a bad policy and ValueError
    for bad arguments; `out` is then untouched.
    """
    from .patches import patch_sam
    from .policy import load_policy

    step = progress or (lambda _: None)
    src, out = Path(checkpoint), Path(out)
    fmt = format_for(out, fmt)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    check_paths(src, out, force)
    if not hasattr(policy, "to_yaml"):  # a name or a file: checked before the (large) checkpoint is read
        refuse_inputs(out, "output", [(f"the policy file {policy}", policy if Path(policy).is_file() else None)])
        policy = load_policy(policy)

    step("load")
    state_dict = load_checkpoint(src, model_type)
    model_type = model_type or infer_model_type(state_dict)[0]
    model = build_model(model_type, empty=True)
    load_weights(model, state_dict, src, assign=True)
    del state_dict

    step("patch")
    handle = patch_sam(model, policy)  # validates the policy against this model; state_dict is unchanged
    handle.restore()
    state_dict = {k: (v.to(DTYPES[dtype]) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "model_type": model_type,
        "policy": policy_yaml(policy),
        "policy_name": str(getattr(policy, "name", "")),
        "sam_sparse_version": __version__,
        "source_sha256": sha256_file(src),
        "source_name": src.name,
        "dtype": dtype,
    }

    step("write")
    # The temporary file carries OUT's suffix, so the reload below reads it exactly as a user reads OUT.
    with atomic_path(out) as tmp:
        write_sparse_checkpoint(tmp, manifest, state_dict, fmt)
        step("reload")
        _check_reload(tmp, out, state_dict, device)
    return ConvertResult(
        out=out,
        manifest=manifest,
        modules_patched=len(handle.report),
        density_by_kind=_density_by_kind(handle.report),
        parameters=sum(p.numel() for p in model.parameters()),
        in_bytes=src.stat().st_size,
        out_bytes=out.stat().st_size,
        notes=list(handle.notes),
    )


def _check_reload(tmp: Path, out: Path, expected: Dict[str, torch.Tensor], device="cpu") -> None:
    """load_sparse_sam the freshly written file and check that it holds exactly `expected`."""
    try:
        model = load_sparse_sam(tmp, device=device, dtype=None)  # the stored dtype: compared exactly below
    except CheckpointError as e:
        raise CheckpointError(f"output {out}: reloading what was written failed ({e})") from None
    got = model.state_dict()
    bad = [k for k, v in expected.items() if k not in got or not torch.equal(got[k].cpu(), v)]
    if bad or len(got) != len(expected):
        raise CheckpointError(f"output {out}: reloading what was written gave different weights ({', '.join(bad[:3])})")
