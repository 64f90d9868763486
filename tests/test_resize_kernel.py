"""kernels.resized_stats and resized_masks (bilinear resizing, once or through a cropped middle grid, then a
threshold; maskgen's fused upsampling) against a float64 oracle written out index by index, on fresh
random inputs every case (the seed is in every failure message).

The Triton kernel (triton_resize.py) runs in Triton's interpreter on CPU tensors (tests/conftest.py); the
torch path (reference.py) runs on the CPU as it does for users there; tests/gpu/test_gpu_maskgen.py runs
the compiled kernel on SAM's shapes. The kernel computes in float32, so a pixel within float32 rounding of
a threshold may land on either side: every check allows exactly those pixels (|oracle - t| < TOL) to
differ and no other. Output masks are poisoned (every byte set) before the kernel writes them.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_upscale_kernel import seeded

from sam_sparse.kernels import resized_masks, resized_stats
from sam_sparse.kernels.interface import HAS_TRITON
from sam_sparse.kernels.resize import box_of

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")
TOL = 1e-4  # float32 rounding of values of a few units, with room

# (K, h, w, size, mid): upscaling in one step, sizes not multiples of the interpreter's 8 x 16 tile; a
# multiple of it; SAM 1's path in small (to a square middle grid, its top-left kept, then to the image);
# a middle grid kept whole; downscaling; a 1 x 1 output; a single column.
CASES = [(3, 9, 11, (37, 45), None), (2, 8, 8, (16, 32), None), (3, 16, 16, (45, 70), (64, 64, 50, 37)),
         (2, 12, 10, (24, 24), (48, 40, 48, 40)), (2, 20, 24, (7, 9), None), (2, 5, 6, (1, 1), (20, 24, 9, 13)),
         (1, 6, 1, (13, 1), None)]


def source(n_out: int, n_in: int):
    """torch's bilinear source rows for each of n_out outputs (align_corners=False), in float64 from torch's
    float32 scale (exact: the scale has 24 bits, d + 0.5 a dozen); the kernel rounds them to float32."""
    d = torch.arange(n_out, dtype=torch.float64)
    scale = float(np.float32(n_in) / np.float32(n_out))
    s = ((d + 0.5) * scale - 0.5).clamp(min=0)
    i0 = s.floor().long()
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, s - i0


def oracle_resize(x, size, mid=None):
    """float64, by gathering the two neighbours along each axis and blending (no interpolate call)."""
    def step(v, out_h, out_w):
        i0, i1, a = source(out_h, v.shape[1])
        j0, j1, b = source(out_w, v.shape[2])
        rows = v[:, i0] * (1 - a)[None, :, None] + v[:, i1] * a[None, :, None]
        return rows[:, :, j0] * (1 - b) + rows[:, :, j1] * b

    v = x.double()
    if mid is not None:
        v = step(v, mid[0], mid[1])[:, :mid[2], :mid[3]]
    return step(v, *size)


def make_maps(g, K, h, w, dtype=torch.float32, noncontig=False):
    """Logit-like maps: smooth blobs of a few units around zero, some all below zero (empty masks)."""
    x = torch.randn(K, h, w, generator=g) * 3 + torch.randn(K, 1, 1, generator=g) * 2
    x[0] -= 20  # never above the threshold: an empty mask, a zero box
    x = x.to(dtype)
    return x.transpose(1, 2).contiguous().transpose(1, 2) if noncontig else x


def check_stats(counts, boxes, ref, threshold, offset, seed, what):
    K = ref.shape[0]
    assert counts.shape == (K, 2) and counts.dtype == torch.int32, (what, seed)
    assert boxes.shape == (K, 4) and boxes.dtype == torch.int64, (what, seed)
    for k in range(K):  # each map on its own
        for j, t in enumerate((threshold + offset, threshold - offset)):
            v = ref[k]
            sure, near = int((v > t + TOL).sum()), int(((v - t).abs() <= TOL).sum())
            assert sure <= int(counts[k, j]) <= sure + near, (
                f"{what}: map {k} count above {t}: {int(counts[k, j])}, oracle {sure} (+{near} within rounding) (seed {seed})")
        strict, loose = box_of((ref[k] > threshold + TOL)[None])[0], box_of((ref[k] > threshold - TOL)[None])[0]
        if not (ref[k] > threshold - TOL).any():
            assert boxes[k].tolist() == [0, 0, 0, 0], (what, k, seed)
            continue
        b = boxes[k].tolist()
        if (ref[k] > threshold + TOL).any():
            assert b[0] <= strict[0] and b[1] <= strict[1] and b[2] >= strict[2] and b[3] >= strict[3], (what, k, b, strict, seed)
        assert b[0] >= loose[0] and b[1] >= loose[1] and b[2] <= loose[2] and b[3] <= loose[3], (what, k, b, loose, seed)


def check_masks(masks, ref, threshold, seed, what):
    assert masks.dtype == torch.bool and masks.shape == ref.shape, (what, seed, masks.shape)
    bad = (masks != (ref > threshold)) & ((ref - threshold).abs() > TOL)
    assert not bad.any(), (f"{what}: {int(bad.sum())} pixels on the wrong side of {threshold}, in maps "
                           f"{bad.flatten(1).any(1).nonzero().flatten().tolist()} (seed {seed})")


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_float64_oracle(triton_resize, case):
    K, h, w, size, mid = case
    seed, g = seeded()
    x = make_maps(g, K, h, w)
    ref = oracle_resize(x, size, mid)
    counts, boxes = resized_stats(x, size, 0.0, 1.0, mid)
    check_stats(counts, boxes, ref, 0.0, 1.0, seed, f"stats {case}")
    check_masks(resized_masks(x, size, 0.0, mid), ref, 0.0, seed, f"masks {case}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_reads_half_inputs_and_strided_maps(triton_resize, dtype):
    seed, g = seeded()
    x = make_maps(g, 3, 10, 13, dtype, noncontig=True)
    assert not x.is_contiguous()
    ref = oracle_resize(x.float(), (29, 31), (40, 52, 33, 47))
    counts, boxes = resized_stats(x, (29, 31), 0.5, 0.75, (40, 52, 33, 47))
    check_stats(counts, boxes, ref, 0.5, 0.75, seed, str(dtype))
    check_masks(resized_masks(x[:, :, :], (29, 31), 0.5, (40, 52, 33, 47)), ref, 0.5, seed, str(dtype))


@needs_triton
def test_masks_land_at_their_index_and_origin_and_nowhere_else(triton_resize):
    seed, g = seeded()
    x = make_maps(g, 3, 8, 9)
    ref = oracle_resize(x, (11, 14))
    out = torch.ones((5, 20, 30), dtype=torch.bool)  # poison: every byte set
    out.view(torch.uint8)[:] = 0xFF
    dest = torch.tensor([4, 0, 2])
    resized_masks(x, (11, 14), 0.0, out=out, dest=dest, origin=(6, 13))
    raw = out.view(torch.uint8)
    for k, d in enumerate(dest.tolist()):
        check_masks(out[d, 6:17, 13:27].clone(), ref[k], 0.0, seed, f"map {k} at {d}")
        region = torch.zeros((20, 30), dtype=torch.bool)
        region[6:17, 13:27] = True
        assert (raw[d][~region] == 0xFF).all(), f"map {k}: a byte outside its region was written (seed {seed})"
        assert (raw[d][region] <= 1).all(), f"map {k}: a byte in its region not written as 0 / 1 (seed {seed})"
    assert (raw[[1, 3]] == 0xFF).all(), "a slot no map names was written"


@needs_triton
def test_maps_past_the_launch_grid_run_in_slices(triton_resize, monkeypatch):
    monkeypatch.setattr(triton_resize, "MAX_GRID_Y", 2)
    seed, g = seeded()
    x = make_maps(g, 5, 7, 6)
    ref = oracle_resize(x, (12, 10), (14, 12, 13, 11))
    counts, boxes = resized_stats(x, (12, 10), 0.0, 1.0, (14, 12, 13, 11))
    check_stats(counts, boxes, ref, 0.0, 1.0, seed, "sliced stats")
    check_masks(resized_masks(x, (12, 10), 0.0, (14, 12, 13, 11)), ref, 0.0, seed, "sliced masks")


@needs_triton
def test_no_maps_and_single_pixels(triton_resize):
    counts, boxes = resized_stats(torch.zeros(0, 4, 4), (8, 8), 0.0, 1.0)
    assert counts.shape == (0, 2) and boxes.shape == (0, 4)
    assert resized_masks(torch.zeros(0, 4, 4), (8, 8), 0.0).shape == (0, 8, 8)
    x = torch.full((1, 8, 8), -5.0)
    x[0, 3, 5] = 50.0  # one hot input pixel: a small blob, away from every edge
    ref = oracle_resize(x, (16, 16))
    counts, boxes = resized_stats(x, (16, 16), 0.0, 1.0)
    check_stats(counts, boxes, ref, 0.0, 1.0, 0, "one blob")
    assert boxes[0].tolist() == box_of(ref[None, 0] > 0)[0].tolist()


def test_torch_path_matches_the_float64_oracle():
    seed, g = seeded()
    for K, h, w, size, mid in CASES:
        x = make_maps(g, K, h, w)
        ref = oracle_resize(x, size, mid)
        counts, boxes = resized_stats(x, size, 0.0, 1.0, mid)
        check_stats(counts, boxes, ref, 0.0, 1.0, seed, f"torch stats {size}")
        check_masks(resized_masks(x, size, 0.0, mid), ref, 0.0, seed, f"torch masks {size}")


def test_oracle_is_torch_interpolate():
    """The oracle is torch's float32 interpolate (its float32 scale) up to float32 rounding of the values."""
    seed, g = seeded()
    x = torch.randn(2, 7, 9, generator=g)
    for size, mid in (((20, 11), None), ((5, 30), (28, 36, 21, 30)), ((900, 700), (1000, 1000, 683, 1000))):
        v = x[:, None]
        if mid is not None:
            v = F.interpolate(v, mid[:2], mode="bilinear", align_corners=False)[..., :mid[2], :mid[3]]
        want = F.interpolate(v, size, mode="bilinear", align_corners=False)[:, 0].double()
        torch.testing.assert_close(oracle_resize(x, size, mid), want, rtol=0, atol=2e-5, msg=f"seed {seed}")


def test_box_of_is_segment_anythings_batched_mask_to_box():
    from segment_anything.utils.amg import batched_mask_to_box

    seed, g = seeded()
    masks = torch.rand(6, 13, 17, generator=g) > 0.97
    masks[2] = False
    assert box_of(masks).tolist() == batched_mask_to_box(masks).tolist(), f"seed {seed}"


def test_bad_inputs_say_what_was_wrong_and_what_is_accepted():
    x = torch.zeros(2, 4, 4)
    for call, words in (
        (lambda: resized_stats(torch.zeros(4, 4), (8, 8), 0.0, 1.0), "expected (maps, h, w)"),
        (lambda: resized_stats(x.int(), (8, 8), 0.0, 1.0), "expected float32"),
        (lambda: resized_stats(x, (8, 0), 0.0, 1.0), "two integers >= 1"),
        (lambda: resized_stats(x, (8, 8), 0.0, 1.0, (8, 8, 9, 8)), "must fit in the middle grid"),
        (lambda: resized_stats(x, (8, 8), (16, 16, 8, 8), 1.0), "threshold=(16, 16, 8, 8): expected a number"),
        (lambda: resized_masks(x, (8, 8), 0.0, 1.0), "mid=1.0: expected None or (MH, MW, CH, CW)"),
        (lambda: resized_masks(x, (8, 8), 0.0, out=torch.zeros(3, 8, 8, dtype=torch.bool)), "indices into out"),
        (lambda: resized_masks(x, (8, 8), 0.0, out=torch.zeros(3, 8, 8), dest=torch.arange(2)), "bool"),
        (lambda: resized_masks(x, (8, 8), 0.0, out=torch.zeros(3, 8, 8, dtype=torch.bool), dest=torch.arange(2),
                               origin=(1, 0)), "outside out's"),
    ):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()


@needs_triton
def test_tuning_space_is_pruned_to_tiles_that_fit(triton_resize):
    prune, configs = triton_resize.prune, triton_resize.CONFIGS
    narrow = prune(configs, {}, IS_WIDE=False)
    assert narrow and all(c.kwargs["BLOCK_X"] < triton_resize.WIDE for c in narrow)
    assert len(narrow) < len(configs) and prune(configs, {}, IS_WIDE=True) == configs
