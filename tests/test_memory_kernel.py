"""The kernel at SAM 2's video memory-attention shapes, scaled down for Triton's interpreter: head dim 256, one
head, the current frame's tokens attending to a memory of whole frames plus pointer tokens, objects of
different memory lengths packed as varlen, against the float64 oracle of tests/oracle.py.

On the GPU the frame is 64 x 64 = 4096 tokens and the memory up to 7 frames + 64 pointer tokens (28,736 keys,
tests/gpu/test_gpu_memory_kernel.py). Here a frame is 12 x 12 = 144 tokens and blocks are 64 tokens, so
memory lengths (148, 296, 444, ...) are never a multiple of the block and span several blocks, and a
frame's blocks straddle frame boundaries, as they would at any block size that does not divide 4096 + pointers.

Also the plans as a memory grows: one tuning run and one plan per length bucket, never a plan per length,
only run-time (unspecialized) scalars changing between lengths of a bucket, and no host sync on a varlen
call that finds its plan. Fresh random inputs every case; the seed is in each failure message.
"""

import inspect
import itertools

import pytest
import torch

from oracle import check_attention, check_varlen
from sam_sparse import block_sparse_attn, block_sparse_attn_varlen
from sam_sparse.kernels import BlockLayout, block_lists, interface
from sam_sparse.kernels.interface import HAS_TRITON
from sam_sparse.kernels.layout import length_bucket

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")

FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROW_FLOOR = {torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}
D = 256
FRAME = 144  # tokens of one frame (a 12 x 12 grid): queries, and each memory frame's keys
BS = 64  # block size: 144 is not a multiple, nor is any memory length below


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


def memory_len(frames: int, pointers: int) -> int:
    """Keys of a memory: `frames` frames, then 4 tokens per object pointer (SAM 2's pointer tokens)."""
    return frames * FRAME + 4 * pointers


def frame_mask(g, n_objects, lengths, frames, drop=0.5, empty=(0, 0)):
    """bool (objects, 1, query blocks, key blocks): per object and query block, each memory frame dropped
    with probability `drop` (its key blocks that lie wholly inside it are removed); the block holding the
    pointer tokens and the blocks straddling frames stay. Query block `empty` of object empty[0]
    attends to nothing."""
    qb, kb = -(-FRAME // BS), -(-max(lengths) // BS)
    m = torch.ones(n_objects, 1, qb, kb, dtype=torch.bool)
    for o, (n, f) in enumerate(zip(lengths, frames)):
        for i in range(qb):
            dropped = [j for j in range(f) if torch.rand(1, generator=g).item() < drop]
            for j in range(kb):
                lo, hi = j * BS, min((j + 1) * BS, n)
                if any(lo >= d * FRAME and hi <= (d + 1) * FRAME for d in dropped):
                    m[o, 0, i, j] = False
    m[empty[0], 0, empty[1]] = False
    return m


def packed(g, lengths_k, dtype):
    """Varlen inputs: every object has FRAME queries; k / v packed over the objects' memory lengths."""
    n = len(lengths_k)
    cu_q = torch.tensor([FRAME * i for i in range(n + 1)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lengths_k)], dtype=torch.int32)
    q = torch.randn(FRAME * n, 1, D, generator=g).to(dtype)
    k = torch.randn(int(cu_k[-1]), 1, D, generator=g).to(dtype)
    v = torch.randn(int(cu_k[-1]), 1, D, generator=g).to(dtype)
    return q, k, v, cu_q, cu_k


def check_objects(out, q, k, v, cu_q, cu_k, mask, seed):
    """Each object's rows against the oracle on its own (q, k, v) and the top-left part of its mask row."""
    check_varlen(out, q, k, v, cu_q, cu_k, mask, BS, seed, FLOOR, ROW_FLOOR)


# ------------------------------------------------------------------------------------------------
# Correctness at head dim 256
# ------------------------------------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("dtype,masked", [(torch.bfloat16, False), (torch.float16, True)],
                         ids=["dense-bf16", "frames-dropped-fp16"])
def test_memory_cross_varlen(triton_kernel, dtype, masked):
    """Three objects prompted on different frames: memories of 1 frame + 1 pointer, 3 frames + 3 pointers,
    2 frames and no pointer (148, 444, 288 keys), one launch, into a NaN-poisoned output."""
    seed, g = seeded()
    frames, pointers = (1, 3, 2), (1, 3, 0)
    lengths = [memory_len(f, p) for f, p in zip(frames, pointers)]
    q, k, v, cu_q, cu_k = packed(g, lengths, dtype)
    mask = frame_mask(g, 3, lengths, frames, empty=(1, 2)) if masked else None
    lists = block_lists(mask) if masked else (None, None)
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    triton_kernel.attention_triton(q, k, v, *lists, None, None, None, D ** -0.5, BS, cu_seqlens_q=cu_q,
                                   cu_seqlens_k=cu_k, max_seqlen_q=FRAME, max_seqlen_k=max(lengths), out=out)
    check_objects(out, q, k, v, cu_q, cu_k, mask, seed)
    if masked:
        assert (out[FRAME + 2 * BS : 2 * FRAME] == 0).all(), f"seed {seed}: the empty query block must give zeros"


@needs_triton
def test_memory_cross_batched_same_length(triton_kernel):
    """Objects with memories of one length as a plain batch (B, Nq, 1, 256): 2 objects, 3 frames + 2
    pointers (440 keys), a frame-dropping mask per object with an empty query block."""
    seed, g = seeded()
    n = memory_len(3, 2)
    q = torch.randn(2, FRAME, 1, D, generator=g).bfloat16()
    k, v = (torch.randn(2, n, 1, D, generator=g).bfloat16() for _ in range(2))
    mask = frame_mask(g, 2, [n, n], [3, 3], empty=(0, 0))
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    triton_kernel.attention_triton(q, k, v, *block_lists(mask), None, None, None, D ** -0.5, BS, out=out)
    check_attention(out, q, k, v, mask, BS, seed, FLOOR, ROW_FLOOR)
    assert (out[0, :BS] == 0).all(), f"seed {seed}: the empty query block must give zeros"


@needs_triton
def test_memory_self_attention(triton_kernel):
    """Memory self-attention: the frame's tokens attend to the frame (144 x 144, head dim 256), fp16."""
    seed, g = seeded()
    q, k, v = torch.randn(2, FRAME, 3, 1, D, generator=g).half().unbind(2)  # views of one projection
    out = block_sparse_attn(q, k, v, block_size=BS)
    check_attention(out, q, k, v, None, BS, seed, FLOOR, ROW_FLOOR)


# ------------------------------------------------------------------------------------------------
# Plans as a memory grows: tuned per bucket, compiled per bucket, no host sync
# ------------------------------------------------------------------------------------------------

def compile_key(triton_kernel, plan):
    """What Triton compiles a plan's launch on, apart from its tensors' dtypes and alignment (fixed here):
    the constexpr values, and for every other scalar its specialization class (== 1, divisible by 16),
    as Triton's own binder computes it, except for the scalars the kernel declares do_not_specialize."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = getattr(triton_kernel._attn_fwd, "fn", triton_kernel._attn_fwd)  # interpreter: the Python function
    params = list(inspect.signature(fn).parameters.values())[triton_kernel._N_TENSORS:]
    key = []
    for p, value in zip(params, plan._tail, strict=True):
        if "constexpr" in str(p.annotation):
            key.append((p.name, value))
        else:
            specialize = p.name not in triton_kernel.RUNTIME_SCALARS
            key.append((p.name, native_specialize_impl(BaseBackend, value, False, specialize, True)))
    return tuple(key)


# A video's memory filling up: frames 1..4 (pointers 1..4), for 2 objects; the second object was
# prompted a frame later, so its memory is a frame shorter (and empty on the first frame: 0 keys).
GROWTH = [(memory_len(f, f), memory_len(max(f - 1, 0), max(f - 1, 0))) for f in range(1, 5)]


@needs_triton
def test_growing_memory_varlen_plans_per_bucket(triton_kernel, monkeypatch):
    """Each call a new mix of lengths; max_seqlen_k 148, 296, 444, 592 falls in buckets 256, 512, 512,
    1024: three plans, three tuning runs (spied on _tune), one compile key per bucket, and outputs
    right at every step (the plan made for 296 keys serves 444)."""
    monkeypatch.setattr(interface, "_PLANS", {})
    tune_keys = []
    real_tune = triton_kernel._tune

    def spy(key, *args, **kw):
        if key not in triton_kernel._TUNED:
            tune_keys.append(key)
        return real_tune(key, *args, **kw)

    monkeypatch.setattr(triton_kernel, "_TUNED", {})
    monkeypatch.setattr(triton_kernel, "_tune", spy)
    seed, g = seeded()
    for lengths in GROWTH:
        q, k, v, cu_q, cu_k = packed(g, lengths, torch.bfloat16)
        out = block_sparse_attn_varlen(q, k, v, cu_q, cu_k, FRAME, max(lengths), block_size=BS)
        check_objects(out, q, k, v, cu_q, cu_k, None, seed)
    buckets = {length_bucket(max(lengths)) for lengths in GROWTH}
    assert len(buckets) == 3
    assert len(interface._PLANS) == len(buckets), f"{len(interface._PLANS)} plans for {len(GROWTH)} lengths"
    assert len(tune_keys) == len(buckets), tune_keys
    keys = {compile_key(triton_kernel, p) for p in interface._PLANS.values()}
    assert len(keys) <= len(buckets), "a plan's compiled kernel depends on more than the length bucket"


@needs_triton
def test_growing_memory_batched_compiles_per_bucket(triton_kernel, monkeypatch):
    """The plain batched path keys a plan per exact length (a plan is cheap: the launch's scalars), but tunes
    once per bucket, and lengths of one bucket differ only in run-time scalars: the constexprs and
    Triton's specialization classes are those of the bucket (EVEN_N aside: a whole or partial last key
    tile, two variants at most)."""
    monkeypatch.setattr(interface, "_PLANS", {})
    monkeypatch.setattr(triton_kernel, "_TUNED", {})
    g = torch.Generator().manual_seed(0)
    # Two buckets (512, 1024), each with a length divisible by 16 and one not: Triton's default
    # specialization of seqlen_k would compile each bucket twice.
    lengths = [memory_len(f, p) for f, p in ((2, 1), (2, 4), (4, 1), (4, 4))]  # 292, 304, 580, 592
    plans = []
    for n in lengths:
        q = torch.randn(1, 16, 1, D, generator=g).bfloat16()
        k = torch.randn(1, n, 1, D, generator=g).bfloat16()
        block_sparse_attn(q, k, k, block_size=BS)
        plans.append(interface._PLANS[interface._fast_key(q, k, k, None, None, None, None, None, BS)])
    assert len(triton_kernel._TUNED) == len({length_bucket(n) for n in lengths}) == 2
    by_bucket = {}
    for n, p in zip(lengths, plans):
        key = tuple(kv for kv in compile_key(triton_kernel, p) if kv[0] != "EVEN_N")
        by_bucket.setdefault(length_bucket(n), set()).add(key)
    assert all(len(keys) == 1 for keys in by_bucket.values()), "a new length would compile the kernel again"


@needs_triton
def test_kernel_declares_its_run_time_scalars(triton_kernel):
    """RUNTIME_SCALARS reach Triton (the interpreter keeps its kwargs, the JIT its attribute) and are
    arguments of the kernel."""
    f = triton_kernel._attn_fwd
    declared = f.kwargs.get("do_not_specialize") if hasattr(f, "kwargs") else f.do_not_specialize
    assert tuple(declared) == triton_kernel.RUNTIME_SCALARS
    assert set(triton_kernel.RUNTIME_SCALARS) <= set(f.arg_names)


SYNCING = ("item", "tolist", "cpu", "numpy", "nonzero", "__int__", "__bool__", "__index__", "__float__")


@needs_triton
@pytest.mark.parametrize("masked", [False, True])
def test_varlen_call_with_a_plan_never_syncs(triton_kernel, monkeypatch, masked):
    """After a first call (which checks cu_seqlens on the host and makes the plan), a call with other lengths
    of the same bucket reads nothing back from the tensors: every tensor method that copies to the host
    is made to raise, the plan's launch is recorded instead of run (the interpreter itself reads tensors
    on the host)."""
    monkeypatch.setattr(interface, "_PLANS", {})
    g = torch.Generator().manual_seed(0)
    first, second = [memory_len(2, 2), memory_len(1, 1)], [memory_len(3, 3), memory_len(2, 2)]  # 296, 444
    layout = None
    if masked:  # one layout for both calls: 7 key blocks cover 444 keys
        layout = BlockLayout.from_mask(torch.rand(2, 1, 3, 7, generator=g) < 0.7, BS)
    q, k, v, cu_q, cu_k = packed(g, first, torch.bfloat16)
    block_sparse_attn_varlen(q, k, v, cu_q, cu_k, FRAME, 400, layout, block_size=None if masked else BS)
    (key,) = interface._PLANS
    calls = []
    interface._PLANS[key] = lambda *args, **kw: calls.append(args) or args[0]
    q, k, v, cu_q, cu_k = packed(g, second, torch.bfloat16)

    def refuse(name):
        def f(*a, **kw):
            raise AssertionError(f"Tensor.{name} called on the varlen fast path: a host sync on the GPU")
        return f

    with monkeypatch.context() as m:
        for name in SYNCING:
            m.setattr(torch.Tensor, name, refuse(name))
        block_sparse_attn_varlen(q, k, v, cu_q, cu_k, FRAME, max(second), layout, block_size=None if masked else BS)
    assert len(calls) == 1 and calls[0][7] is cu_q and calls[0][8] is cu_k


def test_varlen_new_plan_still_checks_values(monkeypatch):
    """The call that makes a plan checks cu_seqlens' values (here: the reference path, no plan yet)."""
    q = torch.randn(3 * FRAME, 1, 16)
    cu = torch.tensor([0, FRAME, 3 * FRAME], dtype=torch.int32)
    monkeypatch.setattr(interface, "_PLANS", {})
    with pytest.raises(ValueError, match=r"below the longest sequences"):
        block_sparse_attn_varlen(q, q, q, cu, cu, FRAME, FRAME)


# ------------------------------------------------------------------------------------------------
# The tuning space at head dim 256
# ------------------------------------------------------------------------------------------------

@needs_triton
def test_wide_head_tuning_space(triton_kernel):
    """Head dim 256 in 16 bits: 64 x 64 tiles (4 warps) and the 128-row tiles over 8 warps that fit Hopper's
    shared memory, TMA only where the inputs allow it (and then in place of the same tiles without it); none
    of the 128-row tiles for fp32 or head dims up to 128 (the SAM shapes' space is unchanged)."""
    base = dict(seqlen_q=4096, seqlen_k=32768, MASK_BLOCK=128, D0=256, D1=0, DV=256, HAS_BIAS=False, IS_FP32=False,
                IS_BF16=True, KH=1, KW=1, tile_w=1, TMA_OK=False, VARLEN=False, WINDOW=False)
    tiles = lambda cs: {(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], bool(c.get("TMA"))) for c in cs}  # noqa: E731
    kept = tiles(triton_kernel._prune(triton_kernel._configs(), base))
    assert kept == {(64, 64, 4, 2, False), (64, 64, 4, 3, False), (128, 64, 8, 2, False), (128, 32, 8, 3, False)}
    hopper = tiles(triton_kernel._prune(triton_kernel._configs(), {**base, "TMA_OK": True}))
    # Where TMA applies, each TMA config replaces its pointer-load twin.
    twins = {(64, 64, 4, 3, False), (128, 64, 8, 2, False)}
    assert hopper == (kept - twins) | {(64, 64, 4, 3, True), (128, 64, 8, 2, True)}
    # V of 64 columns (memory cross-attention, values projected late): two more TMA tiles its smaller stages allow.
    narrow = tiles(triton_kernel._prune(triton_kernel._configs(), {**base, "TMA_OK": True, "DV": 64}))
    assert narrow == hopper | {(128, 64, 8, 3, True), (128, 128, 8, 2, True)}
    assert tiles(triton_kernel._prune(triton_kernel._configs(), {**base, "DV": 64})) == kept  # no TMA: none of them
    for other in (dict(IS_FP32=True, IS_BF16=False), dict(D0=128, DV=128), dict(D0=64, D1=16, DV=80)):
        assert not any(c.get("WIDE") for c in triton_kernel._prune(triton_kernel._configs(), {**base, **other}))
    # V wider than q / k: the accumulator's width decides (v of 256 beside q / k of 64 gets head dim 256's tiles).
    assert tiles(triton_kernel._prune(triton_kernel._configs(), {**base, "D0": 64})) == kept
    # A 64-token mask block holds no 128-row tile.
    assert all(c["BLOCK_M"] <= 64 for c in triton_kernel._prune(triton_kernel._configs(), {**base, "MASK_BLOCK": 64}))


# ------------------------------------------------------------------------------------------------
# V narrower than q / k: the memory cross-attention with its values projected after the attention
# ------------------------------------------------------------------------------------------------

DV = 64  # SAM 2.1's memory features (kv_in_dim): V before v_proj


@needs_triton
@pytest.mark.parametrize("config", [None, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, SPLIT_K=3)],
                         ids=["plain", "split3"])
def test_memory_cross_narrow_values_varlen(triton_kernel, config):
    """Head dim 256 for q / k and 64 for V (memory features before v_proj): three objects of different memory
    lengths packed, a frame-dropping mask with an empty query block, into a NaN-poisoned (total_q, 1, 64)
    output; unsplit and with the keys split over 3 programs (the partials and their merge are 64 wide)."""
    seed, g = seeded()
    frames, pointers = (1, 3, 2), (1, 3, 0)
    lengths = [memory_len(f, p) for f, p in zip(frames, pointers)]
    q, k, _, cu_q, cu_k = packed(g, lengths, torch.bfloat16)
    v = torch.randn(k.shape[0], 1, DV, generator=g).bfloat16()
    mask = frame_mask(g, 3, lengths, frames, empty=(2, 1))
    out = torch.full((q.shape[0], 1, DV), float("nan"), dtype=q.dtype)
    triton_kernel.attention_triton(q, k, v, *block_lists(mask), None, None, None, D ** -0.5, BS, cu_seqlens_q=cu_q,
                                   cu_seqlens_k=cu_k, max_seqlen_q=FRAME, max_seqlen_k=max(lengths), out=out,
                                   config=config)
    check_objects(out, q, k, v, cu_q, cu_k, mask, seed)
    assert (out[2 * FRAME + BS : 2 * FRAME + 2 * BS] == 0).all(), f"seed {seed}: the empty query block must give zeros"


@needs_triton
@pytest.mark.parametrize("d,dv,dtype", [(256, 64, torch.float16), (72, 56, torch.bfloat16), (64, 96, torch.float32),
                                        (80, 256, torch.bfloat16)])
def test_values_with_a_head_dim_of_their_own(triton_kernel, d, dv, dtype):
    """block_sparse_attn with v's head dim other than q / k's, through the public function (the kernel in the
    interpreter, from CPU tensors): wider and narrower V, V split into two chunks (56: one padded chunk; 96 =
    64 + 32) or not, every dtype; 130 queries and 200 keys (no multiple of the 64-token blocks), GQA (4 heads
    over 2), v a non-contiguous view of a larger tensor, a mask with an empty query block. Plans are cached
    per v shape: the same q / k with v of q's head dim gives the plain result."""
    seed, g = seeded()
    q = torch.randn(2, 130, 4, d, generator=g).to(dtype)
    k = torch.randn(2, 200, 2, d, generator=g).to(dtype)
    v = torch.randn(2, 2, 200, dv + 8, generator=g).to(dtype).transpose(1, 2)[..., 4 : 4 + dv]  # (2, 200, 2, dv)
    mask = torch.rand(2, 4, 3, 4, generator=g) < 0.6
    mask[:, :, :, 0] = True
    mask[1, 3, 2] = False  # query block 2 of (batch 1, head 3): no key
    floor = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
    row_floor = {torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}
    out = block_sparse_attn(q, k, v, mask, block_size=64)
    check_attention(out, q, k, v, mask, 64, seed, floor, row_floor)
    assert (out[1, 128:, 3] == 0).all(), f"seed {seed}: the empty query block must give zeros"
    v_same = torch.randn(2, 200, 2, d, generator=g).to(dtype)
    check_attention(block_sparse_attn(q, k, v_same, mask, block_size=64), q, k, v_same, mask, 64, seed, floor,
                    row_floor)

