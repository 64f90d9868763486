"""The kernel runtime's defects (issue: kernel runtime), one regression test each, on CPU: the Triton
kernel in Triton's interpreter and the PyTorch reference path, against the float64 oracle.

Each case draws fresh random inputs and prints its seed when it fails; outputs are checked globally
(relative L2) and per query row (max absolute error).
"""

import copy
import io
import itertools
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import check_attention
from patch_helpers import make_image, pickled, small_sam
from sam_sparse import block_sparse_attn, block_sparse_attn_varlen, patch_sam
from sam_sparse.kernels import BlockLayout
from sam_sparse.policy import Policy, PolicyError

FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
ROW_FLOOR = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(params=[pytest.param("kernel", marks=pytest.mark.interpreter), "reference"])
def path(request, monkeypatch):
    """Route CPU tensors through the Triton kernel (interpreter) or the reference path."""
    if request.param == "kernel":
        pytest.importorskip("triton")
        monkeypatch.setenv("SAM_SPARSE_FORCE_TRITON", "1")
    else:
        monkeypatch.delenv("SAM_SPARSE_FORCE_TRITON", raising=False)
    return request.param


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


def check_rows(out, q, k, v, mask, rel_h=None, rel_w=None, tile=None, bs=128, scale=None, seed=None):
    """Global error <= 2x PyTorch's own in this dtype (+ floor), every query row within a max-abs bound, and
    rows the oracle gives as zeros exactly zero (oracle.check_attention)."""
    check_attention(out, q, k, v, mask, bs, seed, FLOOR, ROW_FLOOR, scale=scale, rel_h=rel_h, rel_w=rel_w,
                    key_tile=tile)


def rnd(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


# --- 1. A partial last key block while seqlen_k is a multiple of the kernel's key tile --------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nq,nk,bs", [(64, 32, 64), (7, 16, 64), (300, 16, 128), (40, 48, 32), (96, 64, 128)])
def test_partial_last_block_with_tile_aligned_keys(path, dtype, nq, nk, bs):
    seed, g = seeded()
    q, k, v = rnd(g, 2, nq, 2, 32, dtype=dtype), rnd(g, 2, nk, 2, 32, dtype=dtype), rnd(g, 2, nk, 2, 32, dtype=dtype)
    mask = torch.rand(2, 2, -(-nq // bs), -(-nk // bs), generator=g) < 0.8
    mask[..., -1] = True  # the partial last key block is always in play
    for m in (mask, BlockLayout.from_mask(mask, bs)):
        out = block_sparse_attn(q, k, v, m, block_size=bs)
        check_rows(out, q, k, v, mask, bs=bs, seed=seed)


# --- 2. Masks and layouts made under torch.inference_mode -------------------------------------------

def test_masks_made_under_inference_mode(path):
    seed, g = seeded()
    q, k, v = rnd(g, 1, 70, 2, 16), rnd(g, 1, 50, 2, 16), rnd(g, 1, 50, 2, 16)
    with torch.inference_mode():
        mask = torch.rand(1, 2, 3, 2, generator=g) < 0.6
        layout = BlockLayout.from_mask(mask, 32)
        out_inside = block_sparse_attn(q, k, v, mask, block_size=32)
    out_outside = block_sparse_attn(q, k, v, layout)
    check_rows(out_inside, q, k, v, mask, bs=32, seed=seed)
    check_rows(out_outside, q, k, v, mask, bs=32, seed=seed)


# --- 4. A mask edited behind torch's back is read afresh ---------------------------------------------

def test_mask_edited_through_data_or_numpy_is_not_stale(path):
    seed, g = seeded()
    q, k, v = rnd(g, 1, 64, 2, 16), rnd(g, 1, 64, 2, 16), rnd(g, 1, 64, 2, 16)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    block_sparse_attn(q, k, v, mask, block_size=32)
    mask.numpy()[0, 0, 0, 1] = False  # shares memory; bumps no version counter
    mask.data[0, 0, 1, 0] = False
    out = block_sparse_attn(q, k, v, mask, block_size=32)
    check_rows(out, q, k, v, mask.clone(), bs=32, seed=seed)


# --- 5. -inf in rel_h / rel_w excludes keys, on every bias path ----------------------------------------

@pytest.mark.parametrize("grid,tile,force", [((14, 14), None, None), ((4, 64), None, None), ((16, 16), (4, 16), None),
                                             ((8, 8), None, 3), ((8, 8), None, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
def test_neg_inf_bias_excludes_keys(path, monkeypatch, grid, tile, force, dtype):
    if force is not None and path == "kernel":  # the reference has one path: it just runs the case again
        from sam_sparse.kernels import triton_attn

        monkeypatch.setattr(triton_attn, "FORCE_BIAS_PATH", force)
    seed, g = seeded()
    n = grid[0] * grid[1]
    q, k, v = rnd(g, 1, n, 2, 32, dtype=dtype), rnd(g, 1, n, 2, 32, dtype=dtype), rnd(g, 1, n, 2, 32, dtype=dtype)
    rel_h, rel_w = rnd(g, 1, 2, n, grid[0], dtype=dtype), rnd(g, 1, 2, n, grid[1], dtype=dtype)
    rel_h[rel_h > 1.0] = float("-inf")  # about 16% of key rows excluded per query
    rel_w[:, :, :5] = float("-inf")  # the first queries see no key at all: zeros
    out = block_sparse_attn(q, k, v, rel_h=rel_h, rel_w=rel_w, key_tile=tile)
    assert (out[:, :5] == 0).all(), f"seed {seed}"
    check_rows(out, q, k, v, None, rel_h, rel_w, tile, seed=seed)


# --- issue 25, item 8: logits at or below the kernel's cut mean "no key", on both paths ----------------

CUT = -1.0e38  # in q.k units: the Triton kernel's NEG_CUT, and sam_sparse.kernels.reference.NEG_CUT


@pytest.mark.parametrize("grid,tile,force", [((14, 14), None, None), ((4, 64), None, None), ((16, 16), (4, 16), None),
                                             ((8, 8), None, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, on purpose
def test_logits_below_the_cut_mean_no_key(path, monkeypatch, grid, tile, force, dtype):
    """A query whose every logit is at or below -1e38 * scale gives zeros on both paths (the kernel's rule:
    it carries -inf as a huge finite number); keys below the cut in a row that has others weigh nothing,
    as -inf keys; -inf beside them still excludes. Checked against the float64 oracle with those keys -inf."""
    if force is not None and path == "kernel":
        from sam_sparse.kernels import triton_attn

        monkeypatch.setattr(triton_attn, "FORCE_BIAS_PATH", force)
    seed, g = seeded()
    n, scale = grid[0] * grid[1], 32**-0.5
    q, k, v = rnd(g, 1, n, 2, 32, dtype=dtype), rnd(g, 1, n, 2, 32, dtype=dtype), rnd(g, 1, n, 2, 32, dtype=dtype)
    rel_h, rel_w = rnd(g, 1, 2, n, grid[0], dtype=dtype), rnd(g, 1, 2, n, grid[1], dtype=dtype)
    below = 1.5 * CUT * scale  # a bias that puts its keys at about -1.5e38 in q.k units, finite in bf16 too
    rel_h[rel_h > 1.0] = below  # partly below: about 16% of each query's key rows
    rel_h[:, :, :4] = below  # queries 0-3: every key below the cut
    rel_w[:, :, 4:6, :2] = float("-inf")  # -inf and the cut in one row
    rel_w[:, :, 6:8] = float("-inf")  # queries 6-7: every key -inf
    out = block_sparse_attn(q, k, v, rel_h=rel_h, rel_w=rel_w, key_tile=tile)
    assert (out[:, :4] == 0).all() and (out[:, 6:8] == 0).all(), f"seed {seed}"
    as_inf = rel_h.masked_fill(rel_h <= below / 2, float("-inf"))
    check_rows(out, q, k, v, None, as_inf, rel_w, tile, seed=seed)


# --- 6. Validation and empty sequences ---------------------------------------------------------------

@pytest.mark.parametrize("bs", [48, 80, 96, 112, 8, 2**17])
def test_block_size_not_a_power_of_two_is_rejected_in_api_and_policy(bs):
    q = torch.randn(1, 64, 2, 16)
    with pytest.raises(ValueError, match=rf"block_size={bs}: expected a power of two from 16 to 65536"):
        block_sparse_attn(q, q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool), block_size=bs)
    with pytest.raises(PolicyError, match=r"block_size: got int .*expected a power of two from 16 to 65536"):
        Policy.from_dict({"name": "x", "block_size": bs, "rules": [{"match": "*", "pattern": "dense"}]})


def test_no_keys_gives_zeros(path):
    q = torch.randn(2, 9, 2, 16)
    k = torch.randn(2, 0, 2, 16)
    out = block_sparse_attn(q, k, k)
    assert out.shape == q.shape and (out == 0).all()


def test_varlen_with_an_empty_key_sequence(path):
    seed, g = seeded()
    lens_q, lens_k = [5, 30, 17], [12, 0, 40]
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32)
    q, k, v = rnd(g, int(cu_q[-1]), 2, 16), rnd(g, int(cu_k[-1]), 2, 16), rnd(g, int(cu_k[-1]), 2, 16)
    mask = torch.rand(3, 2, 1, 2, generator=g) < 0.8
    mask[..., 0] = True
    out = block_sparse_attn_varlen(q, k, v, cu_q, cu_k, 30, 40, mask, block_size=32)
    assert (out[5:35] == 0).all(), f"seed {seed}"
    for i in (0, 2):
        qs, qe, ks, ke = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        m = mask[i : i + 1, :, :1, : -(-(ke - ks) // 32)]
        check_rows(out[None, qs:qe], q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], m, bs=32, seed=seed)


def test_varlen_rejects_nan_scale():
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"softmax_scale=nan: expected a finite number"):
        block_sparse_attn_varlen(q, q, q, cu, cu, 10, 10, softmax_scale=float("nan"))


def test_layout_block_size_must_agree():
    q = torch.randn(1, 64, 2, 16)
    layout = BlockLayout.from_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match=r"block_size=64 but the BlockLayout was built with block_size=32"):
        block_sparse_attn(q, q, q, layout, block_size=64)


def test_patch_sam_leaves_unrunnable_head_dims_alone():
    sam = small_sam(embed_dim=120, num_heads=12)  # head dim 10: the kernel runs multiples of 16
    handle = patch_sam(sam, "dense")
    assert not any(r.kind.startswith("encoder.") for r in handle.report)
    assert any("head dim 10" in n for n in handle.notes)
    assert sum(r.kind.startswith("decoder.") for r in handle.report) == 7
    with torch.no_grad():
        sam.image_encoder(torch.randn(1, 3, 256, 256))  # runs: those layers are SAM's own


# --- 9. No autograd: a clear error on every path --------------------------------------------------------

def test_inputs_that_require_grad_are_refused(path):
    q = torch.randn(1, 32, 2, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"inference-only \(no backward pass\).*torch.no_grad"):
        block_sparse_attn(q, q, q)
    with torch.no_grad():
        block_sparse_attn(q, q, q)


# --- 3, 7, threads: patched models deep-copied, pickled and shared by threads ----------------------------

def predict(sam, image, points):
    from segment_anything import SamPredictor

    pred = SamPredictor(sam)
    pred.set_image(image)
    _, _, low = pred.predict(point_coords=np.array(points, dtype=float), point_labels=np.ones(len(points)))
    return low


def focused_policy():
    return Policy.from_dict({"name": "focused", "block_size": 16, "rules": [
        {"match": ["decoder.token_to_image", "decoder.image_to_token", "decoder.final_token_to_image"],
         "pattern": "region_focused", "params": {"radius": 0.5, "background_stride": 0}},
        {"match": "*", "pattern": "dense"}]})


@pytest.fixture(scope="module")
def focused_sam():
    sam = small_sam(seed=3)
    patch_sam(sam, focused_policy())
    return sam


def test_deepcopy_of_a_patched_model_has_its_own_prompt_context(focused_sam):
    image, pts = make_image(256, seed=1), [[40, 50], [150, 120]]
    clone = copy.deepcopy(focused_sam)
    ctx, ctx_clone = focused_sam._sam_sparse_handle.context, clone._sam_sparse_handle.context
    assert ctx_clone is not ctx
    assert clone.mask_decoder.transformer.layers[0].cross_attn_token_to_image._sam_sparse.context is ctx_clone
    with torch.inference_mode():
        a, b = predict(focused_sam, image, pts), predict(clone, image, pts)
        c = predict(focused_sam, image, [[200, 30]])  # the points decide the mask: a must differ from c
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    clone._sam_sparse_handle.restore()
    assert focused_sam._sam_sparse_handle.active and len(focused_sam.prompt_encoder._forward_pre_hooks) == 1


def test_torch_save_of_a_patched_model(focused_sam, tmp_path):
    image, pts = make_image(256, seed=2), [[60, 70]]
    loaded = pickled(focused_sam)
    with torch.inference_mode():
        np.testing.assert_array_equal(predict(loaded, image, pts), predict(focused_sam, image, pts))
    loaded._sam_sparse_handle.restore()
    assert not hasattr(loaded.mask_decoder.transformer.layers[0].cross_attn_token_to_image, "_sam_sparse")


def test_copies_made_inside_observe_are_not_observed(focused_sam, tmp_path):
    """deepcopy and torch.save inside handle.observe(): the copy starts unobserved (its calls are not
    reported to the original's observer), and a lambda observer does not stop the save."""
    image, pts = make_image(256, seed=5), [[60, 70]]
    seen = []
    with focused_sam._sam_sparse_handle.observe(lambda layer, *rest: seen.append(layer.kind)):
        clone = copy.deepcopy(focused_sam)
        buf = io.BytesIO()
        torch.save(focused_sam, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for copied in (clone, loaded):
        assert not copied._sam_sparse_handle.observing
        with torch.inference_mode():
            predict(copied, image, pts)
        copied._sam_sparse_handle.restore()
    assert seen == []


def test_two_threads_on_one_patched_model(focused_sam):
    image = make_image(256, seed=4)
    prompts = [[[30, 40]], [[200, 180]], [[120, 60], [60, 200]], [[10, 10]]]
    with torch.inference_mode():
        expected = [predict(focused_sam, image, p) for p in prompts]
    got = [None] * len(prompts)
    barrier = threading.Barrier(2)

    def work(i0):
        barrier.wait()
        with torch.inference_mode():
            for _ in range(2):
                for i in range(i0, len(prompts), 2):
                    got[i] = predict(focused_sam, image, prompts[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, r in zip(expected, got):
        np.testing.assert_array_equal(r, e)


# --- Property cases: tile-aligned and odd lengths, block sizes 32-128, per-row errors ---------------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_lengths_and_blocks(path, data):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    length = st.one_of(st.integers(1, 12).map(lambda n: 16 * n), st.integers(1, 6).map(lambda n: 32 * n),
                       st.integers(1, 200))
    nq, nk = data.draw(length, label="seqlen_q"), data.draw(length, label="seqlen_k")
    bs = data.draw(st.sampled_from([32, 64, 128]), label="block_size")
    dtype = data.draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32]), label="dtype")
    d = data.draw(st.sampled_from([16, 32, 80]), label="head_dim")
    q, k, v = rnd(g, 1, nq, 2, d, dtype=dtype), rnd(g, 1, nk, 1, d, dtype=dtype), rnd(g, 1, nk, 1, d, dtype=dtype)
    mask = torch.rand(1, 2, -(-nq // bs), -(-nk // bs), generator=g) < data.draw(st.sampled_from([0.3, 0.7, 1.0]))
    as_layout = data.draw(st.booleans(), label="layout")
    out = block_sparse_attn(q, k, v, BlockLayout.from_mask(mask, bs) if as_layout else mask, block_size=bs)
    check_rows(out, q, k, v, mask, bs=bs, seed=seed)


# --- Per-prompt masks: only where prompts can change them ---------------------------------------------

def test_one_key_block_layers_need_no_per_prompt_mask():
    """SAM's image-to-token attention has a handful of token keys: one key block. Every query block keeps it
    (or gets it back when left empty), so region_focused cannot change that layer: no per-call mask."""
    from sam_sparse.geometry import LayerGeometry, Prompts

    i2t = LayerGeometry(name="mask_decoder.transformer.layers.0.cross_attn_image_to_token", kind="decoder.image_to_token",
                        num_heads=8, seqlen_q=4096, seqlen_k=7, q_grid=(64, 64), block_size=128)
    rule = {"match": "decoder.image_to_token", "pattern": "region_focused", "params": {"radius": 1}}
    policy = Policy.from_dict({"name": "rf", "rules": [rule]})
    prompts = Prompts(points=torch.tensor([[[3.0, 4.0]]]))
    assert not policy.needs_prompts(i2t)
    assert policy.block_mask(i2t, prompts) is None  # what the per-call mask would have been: all kept
    raw = Policy.from_dict({"name": "rf", "allow_empty_rows": True, "rules": [rule]})
    assert raw.needs_prompts(i2t) and not bool(raw.block_mask(i2t, prompts).all())
