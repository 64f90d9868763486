"""What the commands share: --device, model selection, and turning bad input into one-line errors."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import click

from ..devices import DEVICE_ENV, default_device
from ..models import MODEL_TYPES, CheckpointError, FetchError

# Exit codes: 0 ok; 1 a check failed (verify), the weights could not be fetched, or an OS error (disk
# full, permissions); 2 bad input (checkpoint, policy, image, arguments).
EXIT_BAD_INPUT = 2


device_option = click.option(
    "--device", default=None, metavar="DEVICE",
    help="torch device to run on (default: $SAM_SPARSE_DEVICE if set, else cuda when available, else cpu).",
)
model_type_option = click.option(
    "--model-type", type=click.Choice(MODEL_TYPES), default=None,
    help="Model architecture (SAM: vit_b/l/h, mobile_sam; SAM 2.1: sam2.1_hiera_t/s/b+/l, needs the sam2 "
         "extra); default: read from the checkpoint's keys.",
)
checkpoint_option = click.option(
    "--checkpoint", type=click.Path(path_type=Path), default=None, metavar="FILE",
    help="SAM or SAM 2.1 checkpoint (a state dict; SAM 2's released files hold it under 'model'). Default: "
         "the built-in MobileSAM, fetched on first use.",
)
policy_help = "Mask policy: a built-in name (see `sam-sparse policies list`) or a policy YAML file."


def policy_input(policy: Optional[str]) -> tuple:
    """--policy as one of a command's inputs for files.refuse_inputs: (label, its file, or None for a name)."""
    return (f"--policy {policy}", policy if policy is not None and Path(policy).is_file() else None)


def say(text: str = "") -> None:
    """Progress and notes go to stderr, so that stdout holds only the results; tqdm.write keeps a line
    from running into a progress bar that is being drawn."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def fail(message: str, code: int = EXIT_BAD_INPUT):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def guarded(fn):
    """Bad checkpoints, policies, images and arguments: one-line error, exit 2, never a traceback.
    Anything else unexpected (a CUDA error, a bug) is one line too, exit 1; SAM_SPARSE_TRACEBACK=1 shows
    its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FetchError as e:
            fail(str(e), code=1)
        except (CheckpointError, ValueError) as e:  # PolicyError is a ValueError
            fail(" ".join(str(e).split("\n")))
        except OSError as e:  # disk full, permission denied, ...: the environment, not the input
            fail(str(e), code=1)
        except KeyboardInterrupt:
            fail("interrupted", code=130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: it reports them
        except Exception as e:
            if os.environ.get("SAM_SPARSE_TRACEBACK") == "1":
                raise
            fail(f"{type(e).__name__}: {' '.join(str(e).split())} (unexpected; SAM_SPARSE_TRACEBACK=1 shows where)",
                 code=1)

    return wrapper


def resolve_device(device: Optional[str]) -> str:
    """--device, else the default (devices.default_device), checked: a torch device this machine has."""
    import torch

    what = "--device"
    if device is None:
        device = default_device()
        what = f"${DEVICE_ENV}" if os.environ.get(DEVICE_ENV, "").strip() else "the default device"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what} {device!r}: not a torch device ({e}); use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {device}: CUDA is not available on this machine; use --device cpu")
    return str(dev)


def load_model(checkpoint: Optional[Path], model_type: Optional[str], device: str):
    """A Sam from --checkpoint/--model-type; without a checkpoint, the built-in MobileSAM (said on stderr)."""
    from ..models import build_sam, fetch_mobile_sam, infer_model_type

    if checkpoint is None:
        if model_type not in (None, "mobile_sam"):
            raise ValueError(f"--model-type {model_type} needs --checkpoint (only MobileSAM is built in)")
        path = fetch_mobile_sam()
        say(f"Using the built-in default model: MobileSAM ({path}).")
        return build_sam("mobile_sam", path, device=device), "mobile_sam"
    model = build_sam(model_type, checkpoint, device=device)
    return model, model_type or infer_model_type(model.state_dict())[0]


class EncoderProgress:
    """A tqdm bar advanced by each image-encoder forward of `model` (parity runs each image twice)."""

    def __init__(self, model, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="pass")
        self.hook = model.image_encoder.register_forward_hook(self._tick)

    def _tick(self, *_):  # a forward hook must return None, or it replaces the output
        self.bar.update(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hook.remove()
        self.bar.close()


def parity_passes(model) -> int:
    """Image-encoder passes per image in verify_parity: 2 when the encoder gets patched (SAM's ViT, SAM 2's
    Hiera), else 1 (MobileSAM's TinyViT)."""
    from segment_anything.modeling import ImageEncoderViT

    from ..patches import model_family

    return 2 if model_family(model) == "sam2" or isinstance(model.image_encoder, ImageEncoderViT) else 1


def parse_prompts(points, boxes):
    """Click's repeated --point X,Y / --box X0,Y0,X1,Y1 strings -> lists of float tuples (or None)."""
    from ..segment import parse_numbers

    pts = [parse_numbers(p, 2, "--point") for p in points] or None
    bxs = [parse_numbers(b, 4, "--box") for b in boxes] or None
    return pts, bxs


def load_any_model(checkpoint, model_type, sparse_checkpoint, device):
    """(model, model type, manifest policy or None): --sparse-checkpoint (unpatched: the caller patches it, with
    the manifest's policy or another), --checkpoint, or MobileSAM."""
    if sparse_checkpoint is not None:
        if checkpoint is not None or model_type is not None:
            raise ValueError("--sparse-checkpoint carries its model type and weights: drop --checkpoint/--model-type")
        from ..models import infer_model_type, load_sparse_sam

        import torch

        model = load_sparse_sam(sparse_checkpoint, device=device, dtype=None)
        handle = model._sam_sparse_handle
        handle.restore()
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:  # segment-anything's prompt encoder and SamPredictor work in float32
            say(f"note: {sparse_checkpoint} stores {str(dtype).replace('torch.', '')} weights; "
                "running them in float32, as SamPredictor needs")
            model = model.float()
        return model, infer_model_type(model.state_dict())[0], handle.policy
    model, mt = load_model(checkpoint, model_type, device)
    return model, mt, None


sparse_checkpoint_option = click.option(
    "--sparse-checkpoint", type=click.Path(path_type=Path), default=None, metavar="FILE",
    help="A checkpoint written by `sam-sparse convert` (model type and policy from its manifest).",
)
