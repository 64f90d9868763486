"""BlockLayout: a block mask compacted once into the per-row lists the kernel walks.

Like FlexAttention's BlockMask: build it where the mask is built (once, for a fixed mask) and pass it
to block_sparse_attn in place of the bool mask. It is two int32 tensors and three ints, holds no cache
keyed by tensor identity or version, and is built by two tensor ops with no host sync, so it works
under torch.inference_mode, torch.compile and CUDA graph capture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


MAX_BLOCK_SIZE = 1 << 16
BLOCK_SIZES_ACCEPTED = "a power of two from 16 to 65536 (16, 32, 64, 128, 256, ...)"


def length_bucket(n: int) -> int:
    """A sequence length's shape class for tuning and for varlen plans: the next power of two, at least 16
    (the smallest tile). SAM's decoder sides of 6 to 16 tokens share one class; a video memory growing
    frame by frame (4096 keys, then 8192 + pointers, ...) changes class at 4097, 8193 and 16385 keys only."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def is_block_size(n) -> bool:
    """Whether n is a block size the kernel runs: its key and query tiles (powers of two) must divide it."""
    return isinstance(n, int) and not isinstance(n, bool) and 16 <= n <= MAX_BLOCK_SIZE and n & (n - 1) == 0


def check_block_size(block_size) -> int:
    """block_size, or ValueError saying what is accepted (the kernel's tiles must divide a block)."""
    if not is_block_size(block_size):
        raise ValueError(f"block_size={block_size!r}: expected {BLOCK_SIZES_ACCEPTED}")
    return block_size


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Which key blocks each query block attends to, as compacted lists.

    kv_num_blocks: int32 (Bm, Hm, QB): number of active key blocks of each query block.
    kv_indices: int32 (Bm, Hm, QB, KB): the active key-block indices in ascending order, then the
        inactive ones (never read). Bm is 1 or the batch, Hm 1 or the heads (size-1 dims broadcast).
    block_size: tokens per block on both sides, a power of two >= 16. A layout of QB x KB blocks
        serves any seqlen_q, seqlen_k with ceil(seqlen / block_size) == QB, KB; keys past seqlen_k in
        the last block never count.
    """

    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int

    @classmethod
    def from_mask(cls, block_mask: torch.Tensor, block_size: int) -> "BlockLayout":
        """From a bool (Bm, Hm, QB, KB) block mask, True = attend. Two tensor ops, no host sync."""
        check_block_size(block_size)
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool or block_mask.dim() != 4:
            got = f"shape {tuple(block_mask.shape)}, dtype {block_mask.dtype}" if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__
            raise ValueError(f"block_mask has {got}; expected a 4-D bool tensor (batch or 1, heads or 1, query blocks, key blocks)")
        num = block_mask.sum(dim=-1, dtype=torch.int32)
        # A stable sort of "inactive" puts the active blocks first, in ascending key order; the kernel
        # relies on that order to stop at the last block that holds keys.
        idx = torch.argsort((~block_mask).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
        return cls(num.contiguous(), idx.contiguous(), block_size)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(Bm, Hm, QB, KB), as the bool mask it came from."""
        return tuple(self.kv_indices.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to(self, device) -> "BlockLayout":
        return BlockLayout(self.kv_num_blocks.to(device), self.kv_indices.to(device), self.block_size)

    def to_mask(self) -> torch.Tensor:
        """The bool (Bm, Hm, QB, KB) mask back (for inspection, tests and the reference path)."""
        return mask_from_lists(self.kv_num_blocks, self.kv_indices)

    def density(self) -> float:
        """Fraction of (query block, key block) pairs computed, over the stored batch and heads."""
        return float(self.kv_num_blocks.double().mean() / max(1, self.shape[-1]))

    def __repr__(self) -> str:
        return f"BlockLayout(shape={self.shape}, block_size={self.block_size}, device={self.device})"


def mask_from_lists(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """bool (Bm, Hm, QB, KB): True at the first kv_num_blocks entries of each kv_indices row."""
    kb = kv_indices.shape[-1]
    listed = torch.arange(kb, device=kv_indices.device) < kv_num_blocks[..., None].long()
    mask = torch.zeros(kv_indices.shape, dtype=torch.bool, device=kv_indices.device)
    return mask.scatter_(-1, kv_indices.long(), listed)
