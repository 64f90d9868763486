"""maskgen's factored decoder (point_decoder.decode_points) against segment-anything's MaskDecoder, on
MobileSAM's released decoder and the embedding of a real photo, and against SAM 2's, on the CPU:

- in float64 it is the same function (the folds are exact algebra): logits and IoUs equal to 1e-9;
- in float32 it differs from float64 by rounding only, checked per mask;
- the same for SAM 2.1's decoder (object-score token, high-resolution features, choice by stability);
- the generator's decoder="factored" mode is refused where it would compute something else (a sparse
  decoder policy, compiled) and steps aside while a handle observes the decoder; decoder="auto" (the fast
  mode's) uses it only where it computes the same, without an error;
- patches.dense_attention, which it asks first.

Fresh random points every case; the seed is in every failure message.
"""

import copy

import numpy as np
import pytest
import torch

from sam_sparse.maskgen.point_decoder import check_factorable, decode_points


def seeded():
    seed = torch.seed() % 2**31
    return seed, torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def mobile():
    from sam_sparse import build_sam, fetch_mobile_sam

    return build_sam("mobile_sam", fetch_mobile_sam(quiet=True))


@pytest.fixture(scope="module")
def embedding(mobile):
    from skimage import data

    from sam_sparse.maskgen.adapters import SamAdapter

    adapter = SamAdapter(mobile)
    with torch.inference_mode():
        [emb] = adapter.embed([adapter.prepare(data.astronaut())])
    return emb.features


def prompts(mobile, g, n):
    """n single-point prompts (one point and SAM's padding point each): sparse (n, 2, 256), dense (1, 256, 64, 64)."""
    coords = torch.rand(n, 1, 2, generator=g) * 1024
    labels = torch.ones(n, 1, dtype=torch.int)
    with torch.inference_mode():
        sparse, dense = mobile.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    return sparse, dense


def both(mobile, decoder, features, sparse, dense, multimask, dtype):
    pe = mobile.prompt_encoder.get_dense_pe()
    args = [t.to(dtype) for t in (features, pe, sparse, dense)]
    with torch.inference_mode():
        ref = decoder(args[0], args[1], args[2], args[3], multimask)
        ours = decode_points(decoder, args[0], args[1], args[2], args[3][:1], multimask)
    return ref, ours


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("multimask", [True, False])
def test_float64_factored_decoder_is_sams_decoder(mobile, embedding, n, multimask):
    seed, g = seeded()
    decoder = copy.deepcopy(mobile.mask_decoder).double()
    sparse, dense = prompts(mobile, g, n)
    (ref, ref_iou), (low, iou) = both(mobile, decoder, embedding, sparse, dense, multimask, torch.float64)
    assert low.shape == ref.shape == (n, 3 if multimask else 1, 256, 256) and iou.shape == ref_iou.shape
    assert low.dtype == torch.float64
    scale = ref.abs().amax().item()
    assert (low - ref).abs().amax().item() <= 1e-9 * scale, f"seed {seed}"
    per_mask = (low - ref).abs().flatten(2).amax(-1) / ref.abs().flatten(2).amax(-1)
    assert per_mask.amax().item() <= 1e-9, f"seed {seed}: {per_mask}"
    assert torch.allclose(iou, ref_iou, rtol=0, atol=1e-12), f"seed {seed}"


def test_float32_factored_decoder_differs_from_float64_by_rounding(mobile, embedding):
    """Against the float64 truth: at most 5e-5 of the logits' scale overall and 1e-4 of each mask's own
    (over 25 seeds the worst seen were 1.3e-5 and 3e-5; segment-anything's own float32 decoder errs by the
    same order, sometimes more, sometimes less); the IoUs likewise."""
    seed, g = seeded()
    sparse, dense = prompts(mobile, g, 8)
    decoder64 = copy.deepcopy(mobile.mask_decoder).double()
    (truth, truth_iou), _ = both(mobile, decoder64, embedding, sparse, dense, True, torch.float64)
    _, (low, iou) = both(mobile, mobile.mask_decoder, embedding, sparse, dense, True, torch.float32)
    assert low.dtype == torch.float32
    scale = truth.abs().amax().item()
    err = (low.double() - truth).abs()
    assert err.amax().item() <= 5e-5 * scale, f"seed {seed}: {err.amax().item():.3g} at scale {scale:.3g}"
    per_mask = err.flatten(2).amax(-1) / truth.abs().flatten(2).amax(-1)  # (8, 3): each mask alone
    assert (per_mask <= 1e-4).all(), f"seed {seed}: {per_mask}"
    assert (iou.double() - truth_iou).abs().amax().item() <= 5e-5, f"seed {seed}"
    # Binarized, a pixel can only flip where the true logit is within that rounding of the threshold.
    flipped = (low > 0) != (truth > 0)
    assert (truth[flipped].abs() <= 5e-5 * scale).all(), f"seed {seed}"


def test_only_sams_decoder_layout_is_taken_apart(mobile):
    check_factorable(mobile.mask_decoder)
    changed = copy.deepcopy(mobile.mask_decoder)
    changed.output_upscaling[2] = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="the factored decoder needs segment-anything's or SAM 2's MaskDecoder"):
        check_factorable(changed)


def test_generator_refuses_the_factored_decoder_where_it_would_differ(mobile):
    from sam_sparse.maskgen import FAST, AutomaticMaskGenerator, Mode, with_changes
    from sam_sparse.patches import patch_sam

    with pytest.raises(ValueError, match="decoder='quick': expected one of model, factored, auto"):
        Mode("x", decoder="quick")
    for decoder in ("factored", "auto"):
        with pytest.raises(ValueError, match=f"decoder='{decoder}' runs its own .* needs decoder='model'"):
            with_changes(FAST, decoder=decoder, compile_decoder="default")
    model = copy.deepcopy(mobile)
    handle = patch_sam(model, "region_focused")  # a per-prompt decoder policy
    with pytest.raises(ValueError, match="patched with a sparse policy .*; use decoder='model' or 'auto'"):
        AutomaticMaskGenerator(model, with_changes(FAST, decoder="factored"))
    handle.restore()
    AutomaticMaskGenerator(model, with_changes(FAST, decoder="factored"))


def test_auto_decoder_takes_the_decoder_apart_only_where_it_computes_the_same(mobile):
    """FAST's decoder="auto": the factored decoder on a dense model; the model's own decoder (no error, the
    same records as decoder="model") under a sparse decoder policy, which the factored one cannot compute,
    and for a decoder of another layout; back to factored once the policy is restored."""
    from skimage import data
    from test_maskgen import assert_same_records, count_factored_calls

    from sam_sparse.maskgen import FAST, AutomaticMaskGenerator, with_changes
    from sam_sparse.patches import patch_sam

    assert FAST.decoder == "auto"
    image = np.ascontiguousarray(data.coffee()[::4, ::4])
    model = copy.deepcopy(mobile)
    generator = AutomaticMaskGenerator(model, FAST, points_per_side=2)
    calls = count_factored_calls(generator)
    generator.generate(image)
    assert len(calls) == 1
    handle = patch_sam(model, "region_focused")
    sparse = generator.generate(image)
    assert len(calls) == 1, "the factored decoder ran under a sparse decoder policy"
    assert_same_records(sparse, AutomaticMaskGenerator(model, with_changes(FAST, decoder="model"),
                                                       points_per_side=2).generate(image), "auto, sparse decoder")
    handle.restore()
    generator.generate(image)
    assert len(calls) == 2
    model.mask_decoder.output_upscaling[2] = torch.nn.GELU(approximate="tanh")  # not SAM's layout
    other = AutomaticMaskGenerator(model, FAST, points_per_side=2)
    calls = count_factored_calls(other)
    other.generate(image)
    assert not calls


@pytest.fixture(scope="module")
def sam2_parts():
    """SAM 2.1 hiera_t (random weights, sharpened attention) at 256 px and one photo's features, as
    Sam2Adapter.embed gives them."""
    from sam2_helpers import photo, small_sam2

    from sam_sparse.maskgen.adapters import Sam2Adapter

    model = small_sam2()
    adapter = Sam2Adapter(model)
    with torch.inference_mode():
        [emb] = adapter.embed([adapter.prepare(photo())])
    return model, adapter, emb


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("multimask", [True, False])
def test_float64_factored_decoder_is_sam2s_decoder(sam2_parts, n, multimask):
    """SAM 2's decoder: its object-score token, high-resolution features added in the upscaling, and with one
    mask per prompt its choice by stability (dynamic_multimask_via_stability), all in the factored form."""
    model, adapter, emb = sam2_parts
    seed, g = seeded()
    decoder = copy.deepcopy(model.sam_mask_decoder).double()
    assert decoder.pred_obj_scores and decoder.use_high_res_features and decoder.dynamic_multimask_via_stability
    check_factorable(decoder)
    side = model.image_size
    coords = torch.rand(n, 1, 2, generator=g) * side
    labels = torch.ones(n, 1, dtype=torch.int)
    with torch.inference_mode():
        pts = adapter.transforms.transform_coords(coords, normalize=True, orig_hw=(side, side))
        sparse, dense = model.sam_prompt_encoder(points=(pts, labels), boxes=None, masks=None)
        pe = model.sam_prompt_encoder.get_dense_pe()
        image = emb.features["image_embed"][-1].unsqueeze(0)
        high = [f[-1].unsqueeze(0).double() for f in emb.features["high_res_feats"]]
        ref, ref_iou, _, _ = decoder(image_embeddings=image.double(), image_pe=pe.double(),
                                     sparse_prompt_embeddings=sparse.double(), dense_prompt_embeddings=dense.double(),
                                     multimask_output=multimask, repeat_image=n > 1, high_res_features=high)
        low, iou = decode_points(decoder, image.double(), pe.double(), sparse.double(), dense[:1].double(), multimask, high)
    assert low.shape == ref.shape == (n, 3 if multimask else 1, 4 * image.shape[-2], 4 * image.shape[-1])
    per_mask = (low - ref).abs().flatten(2).amax(-1) / ref.abs().flatten(2).amax(-1)
    assert per_mask.amax().item() <= 1e-9, f"seed {seed}: {per_mask}"
    assert torch.allclose(iou, ref_iou, rtol=0, atol=1e-12), f"seed {seed}"


def test_factored_decoder_through_both_kernels(sam2_parts, triton_upscale, triton_few_keys):
    """decode_points in float32 with its two Triton kernels (few-key attention + LayerNorm, upscaling) run by
    the interpreter, as on CUDA, against SAM 2's decoder in float64 (16 x 16 image grid): per mask."""
    model, adapter, emb = sam2_parts
    seed, g = seeded()
    decoder = model.sam_mask_decoder
    decoder64 = copy.deepcopy(decoder).double()
    coords = torch.rand(3, 1, 2, generator=g) * model.image_size
    labels = torch.ones(3, 1, dtype=torch.int)
    with torch.inference_mode():
        pts = adapter.transforms.transform_coords(coords, normalize=True, orig_hw=(model.image_size,) * 2)
        sparse, dense = model.sam_prompt_encoder(points=(pts, labels), boxes=None, masks=None)
        pe = model.sam_prompt_encoder.get_dense_pe()
        image = emb.features["image_embed"][-1].unsqueeze(0)
        high = [f[-1].unsqueeze(0) for f in emb.features["high_res_feats"]]
        ref, _, _, _ = decoder64(image_embeddings=image.double(), image_pe=pe.double(),
                                 sparse_prompt_embeddings=sparse.double(), dense_prompt_embeddings=dense.double(),
                                 multimask_output=True, repeat_image=True, high_res_features=[f.double() for f in high])
        calls = []
        real = triton_few_keys.few_key_attention_norm_triton
        triton_few_keys.few_key_attention_norm_triton = lambda *a, **k: calls.append(1) or real(*a, **k)
        try:
            low, _ = decode_points(decoder, image, pe, sparse, dense[:1], True, high)
        finally:
            triton_few_keys.few_key_attention_norm_triton = real
    assert len(calls) == len(decoder.transformer.layers)  # every image-to-token step through the kernel
    per_mask = (low.double() - ref).abs().flatten(2).amax(-1) / ref.abs().flatten(2).amax(-1)
    assert torch.isfinite(low).all() and per_mask.amax().item() <= 1e-4, f"seed {seed}: {per_mask}"


def test_an_observed_decoder_runs_its_own_calls(mobile):
    """While a handle observes the model, the generator calls the model's own decoder, so the observer sees
    every decoder attention (and the records are the model decoder's: as many as the factored mode's here)."""
    from skimage import data

    from sam_sparse.maskgen import FAST, AutomaticMaskGenerator, with_changes
    from sam_sparse.patches import patch_sam

    model = copy.deepcopy(mobile)
    handle = patch_sam(model, "dense")
    image = np.ascontiguousarray(data.coffee()[::4, ::4])
    generator = AutomaticMaskGenerator(model, with_changes(FAST, decoder="factored"), points_per_side=2)
    plain = generator.generate(image)
    seen = []
    with handle.observe(lambda layer, *rest: seen.append(layer.kind)):
        observed = generator.generate(image)
    assert {"decoder.self", "decoder.token_to_image", "decoder.image_to_token"} <= set(seen)
    assert len(observed) == len(plain)


def test_dense_attention_says_whether_a_part_computes_the_unpatched_math(mobile):
    from sam_sparse.patches import dense_attention, patch_sam

    model = copy.deepcopy(mobile)
    assert dense_attention(model) and dense_attention(model, model.mask_decoder)
    handle = patch_sam(model, "dense")
    assert dense_attention(model, model.mask_decoder)
    with handle.observe(lambda *a: None):
        assert not dense_attention(model, model.mask_decoder)
    handle.restore()
    handle = patch_sam(model, "region_focused")
    assert not dense_attention(model, model.mask_decoder)
    handle.restore()
    assert dense_attention(model, model.mask_decoder)
    handle = patch_sam(model.mask_decoder, "dense")  # the handle sits on the part it patched
    assert dense_attention(model, model.mask_decoder) and dense_attention(model.mask_decoder)
    assert not dense_attention(model.mask_decoder.transformer)  # patched by a handle it cannot see: unknown
    handle.restore()
