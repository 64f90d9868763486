"""Uncompressed run-length encoding, segment-anything's format: {"size": [H, W], "counts": [...]}, runs
in column-major order, the first count for zeros.

The run boundaries are found on the masks' device (rle_runs) and come to the host with the rest of an
image's results in one copy (transfer.to_host); rle_counts turns them into counts there. segment-anything's
mask_to_rle_pytorch reads each mask's boundaries and first pixel back separately (two GPU syncs per
mask) and its rle_to_mask fills a mask in a Python loop per run.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import torch

from .transfer import to_host


def rle_runs(masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """masks (B, H, W) bool -> "change" (n, 2) int64: (mask, position p) wherever pixel p + 1 differs from
    pixel p in column-major order, by mask then position; "first" (B,) bool: each mask's first pixel."""
    flat = masks.permute(0, 2, 1).flatten(1)
    return {"change": (flat[:, 1:] ^ flat[:, :-1]).nonzero(), "first": flat[:, 0]}


def rle_counts(change: np.ndarray, first: np.ndarray, size) -> List[dict]:
    """The RLEs of rle_runs' output, on the host: one dict per mask, counts as Python ints."""
    h, w = (int(v) for v in size)
    per_mask = np.bincount(change[:, 0], minlength=len(first))
    ends = change[:, 1] + 1
    out, start = [], 0
    for i, n in enumerate(per_mask.tolist()):
        edges = np.concatenate(([0], ends[start:start + n], [h * w]))
        counts = [0] if first[i] else []
        counts.extend(np.diff(edges).tolist())
        out.append({"size": [h, w], "counts": counts})
        start += n
    return out


def mask_to_rle(masks: torch.Tensor) -> List[dict]:
    """segment-anything's mask_to_rle_pytorch, the same output: masks (B, H, W) bool -> B RLEs, with one
    host copy for the whole batch."""
    host = to_host(rle_runs(masks))
    return rle_counts(host["change"], host["first"], masks.shape[1:])


def rle_to_mask(rle: dict) -> np.ndarray:
    """segment-anything's rle_to_mask, the same output (H, W) bool, with one np.repeat instead of a Python
    step per run."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = (np.arange(len(counts)) % 2).astype(bool)  # runs alternate, zeros first
    return np.repeat(values, counts).reshape(w, h).transpose()
