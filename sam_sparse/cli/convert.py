"""sam-sparse convert: a SAM checkpoint -> weights + manifest (model type, policy, source hash, dtype)."""

from pathlib import Path

import click

from ..models import DTYPES, MODEL_TYPES
from .common import device_option, guarded, policy_help, resolve_device, say


@click.command()
@click.option("--model-type", type=click.Choice(MODEL_TYPES), default=None,
              help="Architecture of IN; checked against its keys (default: read from them).")
@click.option("--checkpoint", "checkpoint", type=click.Path(path_type=Path), required=True, metavar="IN",
              help="The SAM or SAM 2.1 checkpoint to convert (a state dict; SAM 2's released files hold it under "
                   "'model'). Only read, never written.")
@click.option("--policy", required=True, help=policy_help)
@click.option("--out", type=click.Path(path_type=Path), required=True, metavar="OUT", help="File to write.")
@click.option("--format", "fmt", type=click.Choice(["torch", "safetensors"]), default=None,
              help="torch: one file {'manifest', 'state_dict'}; safetensors: manifest in the header metadata. "
                   "Default: from OUT's name (.safetensors, else torch); a format that contradicts the name is refused.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True,
              help="Floating-point type of the stored weights.")
@click.option("--force", is_flag=True, help="Replace an existing OUT (IN is never written over).")
@device_option
@guarded
def convert(model_type, checkpoint, policy, out, fmt, dtype, force, device):
    """Convert a SAM or SAM 2.1 checkpoint into a sam-sparse checkpoint.

    Writes the weights plus a manifest (model type, the policy as YAML, sam-sparse version, sha256 of
    IN, dtype), through a temporary file in OUT's folder that is reloaded with load_sparse_sam (on
    --device) and checked before it is renamed to OUT. Load the result with sam_sparse.load_sparse_sam(OUT).

    Examples:

    \b
      sam-sparse convert --model-type vit_b --checkpoint sam_vit_b_01ec64.pth \\
          --policy local2d-30 --out sam_vit_b_local2d-30.pt
      sam-sparse convert --checkpoint ~/.cache/sam-sparse/mobile_sam.pt --policy region_focused \\
          --out mobile_sam_rf.safetensors --dtype bf16
      sam-sparse convert --checkpoint sam2.1_hiera_large.pt --policy local2d-30 --out hiera_l_local2d-30.pt
    """
    from tqdm.auto import tqdm

    from ..convert import convert_checkpoint

    steps = ["load", "patch", "write", "reload"]
    with tqdm(total=len(steps), desc="convert", unit="step", bar_format="{desc}: {n}/{total}{postfix}") as bar:
        def progress(name):
            if name != steps[0]:
                bar.update(1)
            bar.set_postfix_str(name)

        result = convert_checkpoint(checkpoint, out, policy, model_type=model_type, fmt=fmt, dtype=dtype,
                                    force=force, device=resolve_device(device), progress=progress)
        bar.update(1)
    say(f"checked {out}: reloaded with load_sparse_sam on {resolve_device(device)} before it took its name: OK")
    click.echo(result.summary())
