"""Many tensors across the host-device boundary in one copy: packed as bytes, each at an 8-byte-aligned
offset, and unpacked into views of their own dtype and shape on the other side.

    host = to_host({"boxes": boxes, "masks": masks})     # one device-to-host copy
    dev = to_device({"coords": coords_np}, "cuda")       # one host-to-device copy, from pinned memory

pack / unpack are the two halves of to_host, for callers that keep the packed buffer (a CUDA graph
writes its outputs into one).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

ALIGN = 8
Layout = List[Tuple[str, int, int, np.dtype, tuple]]  # (name, byte offset, bytes, numpy dtype, shape)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def pack(tensors: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Layout]:
    """The tensors (one device; dtypes numpy knows) as one uint8 tensor on that device, and its layout."""
    parts, layout, offset = [], [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % ALIGN
        parts.append(raw if not pad else torch.cat([raw, raw.new_zeros(pad)]))
        layout.append((name, offset, raw.numel(), numpy_dtype(t.dtype), tuple(t.shape)))
        offset += raw.numel() + pad
    return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)), layout


def unpack(buffer: np.ndarray, layout: Layout) -> Dict[str, np.ndarray]:
    """pack's tensors as numpy views into `buffer` (a host copy of the packed bytes)."""
    return {name: buffer[o:o + n].view(dtype).reshape(shape) for name, o, n, dtype, shape in layout}


def to_host(tensors: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """Every tensor as a numpy array, with one device-to-host copy for all. The arrays are disjoint,
    writable views into one buffer."""
    packed, layout = pack(tensors)
    return unpack(packed.cpu().numpy(), layout)


def stage(arrays: Dict[str, np.ndarray], pin: bool, align: int = 512) -> Tuple[torch.Tensor, Layout]:
    """The arrays packed into one host uint8 tensor (pinned when `pin`), and its layout. Each array starts
    `align` bytes into the buffer, as a fresh CUDA allocation would: a kernel that picks its code path
    by the pointer's alignment (vectorized loads, cuDNN) sees the same alignment class."""
    layout, offset = [], 0
    for name, a in arrays.items():
        layout.append((name, offset, a.nbytes, a.dtype, a.shape))
        offset += a.nbytes + (-a.nbytes % align)
    host = torch.empty(max(offset, align), dtype=torch.uint8, pin_memory=pin)
    staged = host.numpy()
    for name, o, n, _, _ in layout:
        staged[o:o + n] = np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)
    return host, layout


def views(buffer: torch.Tensor, layout: Layout) -> Dict[str, torch.Tensor]:
    """stage's arrays as tensor views into `buffer` (the staged bytes, on any device)."""
    return {name: buffer[o:o + n].view(torch_dtype(dtype)).reshape(shape) for name, o, n, dtype, shape in layout}


def to_device(arrays: Dict[str, np.ndarray], device) -> Dict[str, torch.Tensor]:
    """Every array as a tensor on `device`, with one host-to-device copy for all (from pinned memory, not
    waited for: work queued after it on the current stream sees the data). On the CPU, no copy."""
    device = torch.device(device)
    if device.type != "cuda":
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}
    host, layout = stage(arrays, pin=True)
    return views(host.to(device, non_blocking=True), layout)
