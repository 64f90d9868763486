"""Bilinear resizing of many single-channel maps, then a threshold, without writing the resized floats:
the functional API, its checks and dispatch.

    counts, boxes = resized_stats(x, (H, W), threshold=0.0, offset=1.0, mid=(1024, 1024, ch, cw))
    masks = resized_masks(x, (H, W), threshold=0.0, mid=(1024, 1024, ch, cw))

The resize is torch's F.interpolate(mode="bilinear", align_corners=False) from (h, w) to (H, W), or
through a middle grid: to (MH, MW), keep its top-left (CH, CW), then to (H, W). resized_stats gives per map
the pixel counts above threshold + offset and above threshold - offset and the bounding box of the pixels
above threshold; resized_masks gives (or writes) the pixels above threshold. CUDA tensors run the Triton
kernel (triton_resize.py): per map it reads the (h, w) input and writes six integers or one byte per
pixel, where resizing first writes and rereads MH * MW + H * W floats. CPU tensors run torch's own ops
(reference.py), unless SAM_SPARSE_FORCE_TRITON=1 and TRITON_INTERPRET=1 are both set (as few_keys.py).
The kernel's values agree with torch's to float32 rounding, so a pixel within rounding of a threshold
may fall on the other side of it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .interface import describe_tensor, use_triton
from .reference import resize_reference

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x: torch.Tensor, size, mid, **numbers) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x: {describe_tensor(x) if isinstance(x, torch.Tensor) else type(x).__name__}; "
                         "expected (maps, h, w)")
    if x.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"x: dtype {x.dtype}; expected float32, float16, bfloat16 (or float64 on the CPU)")
    if x.shape[0] and (x.shape[1] < 1 or x.shape[2] < 1):
        raise ValueError(f"x: {describe_tensor(x)}; expected maps of at least 1 x 1")
    if not isinstance(size, (tuple, list)) or len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"size={size!r}: expected (H, W), two integers >= 1")
    for name, v in numbers.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
            raise ValueError(f"{name}={v!r}: expected a number")
    if mid is not None:
        if not isinstance(mid, (tuple, list)) or len(mid) != 4 or any(not isinstance(s, int) or s < 1 for s in mid):
            raise ValueError(f"mid={mid!r}: expected None or (MH, MW, CH, CW), four integers >= 1")
        if mid[2] > mid[0] or mid[3] > mid[1]:
            raise ValueError(f"mid={mid!r}: the kept (CH, CW) must fit in the middle grid (MH, MW)")


def _on_triton(x: torch.Tensor) -> bool:
    return use_triton(x) and x.dtype != torch.float64


def resized_stats(x: torch.Tensor, size: Tuple[int, int], threshold: float, offset: float,
                  mid: Optional[Tuple[int, int, int, int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per map of x (K, h, w), resized to size (H, W) (through mid (MH, MW, CH, CW) when given):

    counts (K, 2) int32: the pixels above threshold + offset, and above threshold - offset (thresholds
        rounded to float32, as torch compares a float32 tensor with a Python float);
    boxes (K, 4) int64: (left, top, right, bottom) of the pixels above threshold, inclusive pixel indices;
        (0, 0, 0, 0) for a map with none (segment-anything's batched_mask_to_box).
    """
    _check(x, size, mid, threshold=threshold, offset=offset)
    if not _on_triton(x):
        v = resize_reference(x, size, mid)
        counts = torch.stack([(v > threshold + offset).flatten(1).sum(1), (v > threshold - offset).flatten(1).sum(1)], 1)
        return counts.to(torch.int32), box_of(v > threshold)
    from .triton_resize import resize_threshold_triton

    acc = resize_threshold_triton(x, size, mid, float(threshold), float(offset))
    H, W = size
    boxes = torch.stack([W - acc[:, 2], H - acc[:, 3], acc[:, 4] - 1, acc[:, 5] - 1], 1).long()
    return acc[:, :2], torch.where(acc[:, 4:5] > 0, boxes, torch.zeros_like(boxes))


def resized_masks(x: torch.Tensor, size: Tuple[int, int], threshold: float,
                  mid: Optional[Tuple[int, int, int, int]] = None, out: Optional[torch.Tensor] = None,
                  dest: Optional[torch.Tensor] = None, origin: Tuple[int, int] = (0, 0)) -> torch.Tensor:
    """x (K, h, w) resized to size (H, W) (through mid when given), above threshold: (K, H, W) bool; or,
    with out (N, OH, OW) bool and dest (K,) integer indices into out's first axis, written into
    out[dest[k], oy:oy + H, ox:ox + W] for origin (oy, ox), and out returned. out is not cleared first."""
    _check(x, size, mid, threshold=threshold)
    K = x.shape[0]
    if out is None:
        out = torch.empty((K, *size), dtype=torch.bool, device=x.device)
        dest = torch.arange(K, device=x.device)
    elif dest is None or dest.dim() != 1 or len(dest) != K:
        raise ValueError(f"dest: {describe_tensor(dest) if dest is not None else None}; expected ({K},) indices into out")
    if out.dtype != torch.bool or out.dim() != 3 or out.device != x.device:
        raise ValueError(f"out: {describe_tensor(out)}; expected (N, OH, OW) bool on {x.device}")
    oy, ox = origin
    if oy < 0 or ox < 0 or oy + size[0] > out.shape[1] or ox + size[1] > out.shape[2]:
        raise ValueError(f"origin={origin!r} with size {size}: outside out's {tuple(out.shape[1:])}")
    if not _on_triton(x):
        out[dest, oy:oy + size[0], ox:ox + size[1]] = resize_reference(x, size, mid) > threshold
        return out
    from .triton_resize import resize_threshold_triton

    return resize_threshold_triton(x, size, mid, float(threshold), out=out, dest=dest.to(x.device, torch.int64),
                                   origin=(oy, ox))


def box_of(masks: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool -> (K, 4) int64 (left, top, right, bottom) of each mask's pixels, (0, 0, 0, 0) when
    it has none."""
    K, H, W = masks.shape
    if K == 0:
        return torch.zeros((0, 4), dtype=torch.int64, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)
    ys = torch.arange(H, device=masks.device)
    xs = torch.arange(W, device=masks.device)
    top = torch.where(rows, ys, H).min(1).values
    bottom = torch.where(rows, ys, -1).max(1).values
    left = torch.where(cols, xs, W).min(1).values
    right = torch.where(cols, xs, -1).max(1).values
    boxes = torch.stack([left, top, right, bottom], 1)
    return torch.where(rows.any(1, keepdim=True), boxes, torch.zeros_like(boxes))
