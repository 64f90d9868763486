"""Split-KV (a launch config's SPLIT_K): each query tile's key steps shared out over SPLIT_K programs that
write fp32 partial outputs and row log-sum-exps, merged by a second kernel (triton_attn._split_combine).
The tuner tries it where a call's query tiles leave SMs idle (one object's memory attention); here it is
forced through the config, in Triton's interpreter, against the float64 oracle of tests/oracle.py.

Edges: more splits than a tile has key steps (empty splits must not count), a query block whose mask lists
no key block (zeros, never NaN), varlen objects of different lengths (some with fewer steps than splits),
lengths that are no multiple of the tile, head dims split in two chunks (80 = 64 + 16, the second partial
written too; 72 = 0-63 + 56-71, overlapping) or padded (56 -> 64, 72 -> 128: the merge must stop at the real
head dim, past it lies the next head) with several heads per kv head, query tiles of 16 and 64 rows beside
the merge's 32-row blocks, the rel-pos bias path that loads rel_h one step ahead (it must start at the
split's first step), fp32 / fp16 / bf16. Every output is poisoned with NaN first. Fresh seeds; each message names it.
"""

import pytest
import torch

from oracle import check_attention, check_varlen, packed_inputs
from sam_sparse.kernels import block_lists
from sam_sparse.kernels.interface import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROW_FLOOR = {torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


def config(bm, bn, split):
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=2, SPLIT_K=split)


def poisoned(q):
    return torch.full(q.shape, float("nan"), dtype=q.dtype)


@needs_triton
@pytest.mark.parametrize("dtype,head_dim,split", [(torch.float32, 64, 2), (torch.float16, 80, 3),
                                                  (torch.bfloat16, 32, 7)],
                         ids=["fp32-d64-2", "fp16-d80-3", "bf16-d32-7"])
def test_split_masked_batch(triton_kernel, dtype, head_dim, split):
    """(2, 100, 2 heads) x 300 keys, 32-key tiles in 64-key blocks: 10 key steps per dense tile, fewer under
    the mask; 7 splits leave some programs without a step. Query block 0 of (batch 0, head 0) keeps nothing."""
    seed, g = seeded()
    q = torch.randn(2, 100, 2, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(2, 300, 2, head_dim, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(2, 2, 2, 5, generator=g) < 0.6
    mask[0, 0, 0] = False
    out = poisoned(q)
    triton_kernel.attention_triton(q, k, v, *block_lists(mask), None, None, None, head_dim ** -0.5, 64, out=out,
                                   config=config(32, 32, split))
    check_attention(out, q, k, v, mask, 64, seed, FLOOR, ROW_FLOOR)
    assert (out[0, :64, 0] == 0).all(), f"seed {seed}: the empty query block must give zeros"


@needs_triton
@pytest.mark.parametrize("head_dim,heads,kv_heads,bm,bn,split,dtype,overlap", [
    (56, 4, 2, 64, 16, 3, torch.float16, False),   # 56 run as 64 columns, the last 8 masked: the merge must not write them
    (72, 3, 1, 16, 32, 2, torch.float32, False),  # 72 as 128 columns; GQA 3 / 1; 16-row tiles under 32-row merge blocks
    (72, 4, 2, 64, 16, 3, torch.float16, True),   # 72 as columns 0-63 and 56-71: the partials' shared columns once
    (40, 3, 1, 16, 32, 2, torch.bfloat16, True),  # 40 as 0-31 and 24-39
], ids=["d56-gqa2-64x16-3", "d72-mqa-16x32-2", "d72-overlap-gqa2-64x16-3", "d40-overlap-mqa-16x32-2"])
def test_split_padded_head_dims_and_gqa(triton_kernel, monkeypatch, head_dim, heads, kv_heads, bm, bn, split, dtype,
                                        overlap):
    """Head dims the kernel pads to a power of two, or (OVERLAP_SECOND_CHUNK) splits into two chunks that
    overlap, several heads sharing kv heads: each head's rows written by the merge must stop at the real
    head dim (past it lies the next head). 90 queries x 200 keys."""
    monkeypatch.setattr(triton_kernel, "OVERLAP_SECOND_CHUNK", overlap)
    seed, g = seeded()
    q = torch.randn(2, 90, heads, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(2, 200, kv_heads, head_dim, generator=g).to(dtype) for _ in range(2))
    out = poisoned(q)
    triton_kernel.attention_triton(q, k, v, None, None, None, None, None, head_dim ** -0.5, 64, out=out,
                                   config=config(bm, bn, split))
    check_attention(out, q, k, v, None, 64, seed, FLOOR, ROW_FLOOR)


@needs_triton
def test_split_dense_non_contiguous_bf16(triton_kernel):
    """q, k, v as views of one fused projection (1, 96, 3, 2, 64), dense, 4 splits of 6 key steps."""
    seed, g = seeded()
    q, k, v = torch.randn(1, 96, 3, 2, 64, generator=g).bfloat16().unbind(2)
    out = poisoned(q)
    triton_kernel.attention_triton(q, k, v, None, None, None, None, None, 0.125, 64, out=out,
                                   config=config(32, 16, 4))
    check_attention(out, q, k, v, None, 64, seed, FLOOR, ROW_FLOOR)


@needs_triton
def test_split_varlen_objects(triton_kernel):
    """Three sequences packed as varlen: 40 x 300, 100 x 17 (one key step: two of three splits empty) and
    64 x 129 keys (a partial last tile), into one poisoned output, each against the oracle on its own."""
    seed, g = seeded()
    lq, lk = [40, 100, 64], [300, 17, 129]
    q, k, v, cu_q, cu_k = packed_inputs(g, lq, lk, 1, 1, 256, torch.bfloat16)
    out = poisoned(q)
    triton_kernel.attention_triton(q, k, v, None, None, None, None, None, 256 ** -0.5, 64, cu_seqlens_q=cu_q,
                                   cu_seqlens_k=cu_k, max_seqlen_q=max(lq), max_seqlen_k=max(lk), out=out,
                                   config=config(32, 32, 3))
    check_varlen(out, q, k, v, cu_q, cu_k, None, 64, seed, FLOOR, ROW_FLOOR)


@needs_triton
def test_split_relpos_one_row_tiles(triton_kernel):
    """SAM's decomposed rel-pos on a 16 x 16 grid with 16-key tiles (one grid row each: rel_h is loaded a
    step ahead, from the split's first step), 3 splits of 16 steps, a mask with an empty query block."""
    seed, g = seeded()
    n, d = 256, 64
    q, k, v = (torch.randn(1, n, 2, d, generator=g).half() for _ in range(3))
    rel_h, rel_w = (torch.randn(1, 2, n, 16, generator=g).half() * 2 for _ in range(2))
    mask = torch.rand(1, 2, 4, 4, generator=g) < 0.7
    mask[0, 1, 2] = False
    out = poisoned(q)
    triton_kernel.attention_triton(q, k, v, *block_lists(mask), rel_h, rel_w, None, d ** -0.5, 64, out=out,
                                   config=config(32, 16, 3))
    check_attention(out, q, k, v, mask, 64, seed, FLOOR, ROW_FLOOR, rel_h=rel_h, rel_w=rel_w)
    assert (out[0, 128:192, 1] == 0).all(), f"seed {seed}: the empty query block must give zeros"


@needs_triton
@pytest.mark.parametrize("bad", [0, 17, 2.0, True, "all"])
def test_split_config_checked(triton_kernel, bad):
    q = torch.randn(1, 32, 1, 16)
    with pytest.raises(ValueError, match="SPLIT_K must be an int in 1..16 or 'fill'"):
        triton_kernel.attention_triton(q, q, q, None, None, None, None, None, 0.25, 64, config=config(16, 16, bad))


def test_fill_splits_fills_the_sms_once():
    """One object's memory attention on 132 SMs: 32 tiles of 128 rows -> 4 splits (128 programs), 64 tiles
    of 64 -> 2; 96 tiles -> none; never more than MAX_SPLIT, never under MIN_SPLIT_STEPS steps a split."""
    from sam_sparse.kernels.triton_attn import MAX_SPLIT, fill_splits

    assert fill_splits(32, 449, 132) == 4
    assert fill_splits(64, 449, 132) == 2
    assert fill_splits(96, 449, 132) == 1
    assert fill_splits(1, 10_000, 132) == MAX_SPLIT
    assert fill_splits(2, 9, 132) == 2  # 9 key steps: splits of at least 4
