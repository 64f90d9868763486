"""The ``sam-sparse`` command line: one click group, thin commands over library functions."""

import click

from .policies import policies


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Block-sparse attention for Segment Anything."""


main.add_command(policies)
