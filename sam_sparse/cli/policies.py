import click


@click.group()
def policies():
    """List, show, render and check mask policies."""
