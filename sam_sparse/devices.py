"""The default torch device of every job and command."""

import os

import torch

DEVICE_ENV = "SAM_SPARSE_DEVICE"


def default_device() -> str:
    """$SAM_SPARSE_DEVICE when set (e.g. "cpu" on a GPU machine), else "cuda" when a CUDA device is
    available, else "cpu". A --device option, where a command has one, wins over both."""
    given = os.environ.get(DEVICE_ENV, "").strip()
    if given:
        return given
    return "cuda" if torch.cuda.is_available() else "cpu"
