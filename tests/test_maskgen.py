"""sam_sparse.maskgen against the generators it stands in for, on the CPU: MobileSAM (released weights) and
SAM 2.1 hiera_t (random weights) on small scikit-image photos.

- exact mode: records equal to segment-anything's SamAutomaticMaskGenerator's (and sam2's
  SAM2AutomaticMaskGenerator's): every mask, every field with its type, the order; several decoder
  batches, crop layers, the three output modes, SAM 2's mask-to-mask refinement and single-mask grid;
- fast mode, and its factored decoder: >= 99% of segment-anything's masks found again at IoU >= 0.9 on 3
  photos;
- a stability filter moved before upsampling changes the records (so the equality tests can see it);
- the helpers: one-copy transfers, run-length encoding, read-ahead.

The reference generators and the pipeline share the models' forwards through tests/memo.py (the same
call, layout included, runs once); what differs between them, the post-processing, always runs.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
from memo import memoize
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea")
SETTINGS = dict(points_per_side=4, points_per_batch=16)


def photo(name: str, side: int = 160) -> np.ndarray:
    from skimage import data

    img = getattr(data, name)()
    h, w = img.shape[:2]
    s = side / max(h, w)
    return np.asarray(Image.fromarray(img).resize((round(w * s), round(h * s))))


def fields(record: dict) -> str:
    """Every field but the mask, as JSON writes it (so 3 and 3.0 differ)."""
    return json.dumps({k: v for k, v in record.items() if k != "segmentation"})


def assert_same_records(ours: list, ref: list, what: str = "") -> None:
    assert len(ours) == len(ref), f"{what}: {len(ours)} records, reference {len(ref)}"
    for i, (a, b) in enumerate(zip(ours, ref)):
        if isinstance(b["segmentation"], np.ndarray):
            assert a["segmentation"].dtype == b["segmentation"].dtype, f"{what}: record {i}"
            assert np.array_equal(a["segmentation"], b["segmentation"]), f"{what}: record {i}: mask differs"
        else:
            assert a["segmentation"] == b["segmentation"], f"{what}: record {i}: RLE differs"
        assert fields(a) == fields(b), f"{what}: record {i}:\n{fields(a)}\n{fields(b)}"


def best_ious(ref: list, ours: list) -> np.ndarray:
    """For each reference mask, its best IoU among ours (float64 counts)."""
    if not ours:
        return np.zeros(len(ref))
    a = np.stack([r["segmentation"] for r in ref]).reshape(len(ref), -1).astype(np.float64)
    b = np.stack([r["segmentation"] for r in ours]).reshape(len(ours), -1).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None] - inter
    return (inter / np.maximum(union, 1)).max(1)


@pytest.fixture(scope="module")
def mobile():
    from sam_sparse import build_sam, fetch_mobile_sam

    model = build_sam("mobile_sam", fetch_mobile_sam(quiet=True))
    model.memo = memoize(model)
    return model


@pytest.fixture(scope="module")
def photos():
    return {name: photo(name) for name in PHOTOS}


@pytest.fixture(scope="module")
def references(mobile, photos):
    from segment_anything import SamAutomaticMaskGenerator

    with torch.inference_mode():
        return {name: SamAutomaticMaskGenerator(mobile, **SETTINGS).generate(img) for name, img in photos.items()}


# --- exact mode: segment-anything's records -----------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_exact_mode_gives_segment_anythings_records(mobile, photos, references, name):
    from sam_sparse.maskgen import AutomaticMaskGenerator

    ours = AutomaticMaskGenerator(mobile, "exact", **SETTINGS).generate(photos[name])
    assert len(references[name]) > 0
    assert_same_records(ours, references[name], name)


def test_exact_mode_over_several_decoder_batches_and_output_modes(mobile, photos):
    """3 points per batch (16 points: five batches of 3 and one of 1). Here a batch keeps no mask, and
    segment-anything's concatenation then turns the crop's int boxes into floats: the records must show
    floats too. And the RLE output modes."""
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse.maskgen import AutomaticMaskGenerator

    settings = dict(SETTINGS, points_per_batch=3)
    for output_mode in ("binary_mask", "uncompressed_rle", "coco_rle"):
        with torch.inference_mode():
            ref = SamAutomaticMaskGenerator(mobile, output_mode=output_mode, **settings).generate(photos["astronaut"])
        ours = AutomaticMaskGenerator(mobile, "exact", output_mode=output_mode, **settings).generate(photos["astronaut"])
        assert len(ref) > 0 and isinstance(ref[0]["bbox"][0], float), "no empty batch: the case tests less"
        assert_same_records(ours, ref, output_mode)


@pytest.mark.parametrize("batches_per_group", [1, 2])
def test_exact_mode_when_decoder_batches_are_filtered_in_groups(mobile, photos, monkeypatch, batches_per_group):
    """The decoder batches of a crop are filtered together, up to FILTER_BYTES of logits at a time: with
    groups of one batch and of two (3 points per batch, a batch that keeps no mask), the records are still
    segment-anything's, int-to-float boxes included."""
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse.maskgen import AutomaticMaskGenerator, pipeline

    settings = dict(SETTINGS, points_per_batch=3)
    per_batch = 3 * 3 * 256 * 256 * 4  # 3 points x 3 masks of 256 x 256 float32 logits
    monkeypatch.setattr(pipeline, "FILTER_BYTES", per_batch * batches_per_group)
    with torch.inference_mode():
        ref = SamAutomaticMaskGenerator(mobile, **settings).generate(photos["astronaut"])
    ours = AutomaticMaskGenerator(mobile, "exact", **settings).generate(photos["astronaut"])
    assert len(ref) > 0 and isinstance(ref[0]["bbox"][0], float), "no empty batch: the case tests less"
    assert_same_records(ours, ref, f"groups of {batches_per_group}")


def test_exact_mode_with_a_crop_layer(mobile, photos):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse.maskgen import AutomaticMaskGenerator

    settings = dict(points_per_side=2, crop_n_layers=1)
    with torch.inference_mode():
        ref = SamAutomaticMaskGenerator(mobile, **settings).generate(photos["astronaut"])
    ours = AutomaticMaskGenerator(mobile, "exact", **settings).generate(photos["astronaut"])
    assert len({tuple(r["crop_box"]) for r in ref}) > 1, "no mask from a crop: the test would not test crops"
    assert_same_records(ours, ref, "crop_n_layers=1")


def count_fused_calls(monkeypatch) -> list:
    """A list that grows by one per call of kernels.resize's resized_stats or resized_masks in the pipeline."""
    from sam_sparse.maskgen import pipeline

    calls = []
    for name in ("resized_stats", "resized_masks"):
        real = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    return calls


@pytest.mark.parametrize("settings", [SETTINGS, dict(points_per_side=2, crop_n_layers=1)], ids=["grid", "crops"])
def test_fused_upsampling_on_the_torch_path_gives_segment_anythings_records(mobile, photos, references,
                                                                            settings, monkeypatch):
    """Mode(upsample="fused") routes the upsampling, scoring, boxes and final masks through kernels.resize.
    On the CPU that is torch's own interpolation of the same logits, so exact mode stays exact: the records
    show that the pipeline feeds it the model's resize steps, the thresholds, and (crops) each crop's
    masks at its place in the image. tests/gpu/test_gpu_maskgen.py checks the kernel's agreement."""
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse.maskgen import EXACT, AutomaticMaskGenerator, with_changes

    calls = count_fused_calls(monkeypatch)
    with torch.inference_mode():
        ref = SamAutomaticMaskGenerator(mobile, **settings).generate(photos["astronaut"])
    ours = AutomaticMaskGenerator(mobile, with_changes(EXACT, upsample="fused"), **settings).generate(photos["astronaut"])
    assert {"resized_stats", "resized_masks"} <= set(calls), calls
    assert len(ref) > 0
    assert_same_records(ours, ref, f"fused upsampling, {settings}")
    auto = AutomaticMaskGenerator(mobile, with_changes(EXACT, upsample="auto"), **settings)
    assert not auto.fused_upsample, "upsample='auto' fuses on CUDA only (the torch path holds every mask)"


# --- fast mode: agreement -----------------------------------------------------------------------------


def count_factored_calls(generator) -> list:
    """A list that grows by one per call of the generator's factored decoder (so a silent fall-back to the
    model's decoder, which also meets the agreement bar, is seen)."""
    calls, real = [], generator.adapter.decode_factored
    generator.adapter.decode_factored = lambda *a, **k: calls.append(1) or real(*a, **k)
    return calls


@pytest.mark.parametrize("decoder", ["auto", "model"])
def test_fast_mode_keeps_99_percent_of_the_masks(mobile, photos, references, decoder):
    """The fast mode (decoder="auto": the factored decoder, point_decoder.py, on MobileSAM) and the fast
    mode with the model's own decoder on 1024-point batches. And, printed for docs/benchmarks.md (pytest
    -s), what scoring stability on the low-res logits alone would keep (not asserted: not the fast mode)."""
    from sam_sparse.maskgen import FAST, AutomaticMaskGenerator, with_changes

    fast = with_changes(FAST, decoder=decoder)
    low_res_only = with_changes(fast, stability_on="low_res", low_res_margin=None)
    for mode in (low_res_only, fast):
        generator = AutomaticMaskGenerator(mobile, mode, **SETTINGS)
        calls = count_factored_calls(generator)
        ious = np.concatenate([best_ious(references[n], generator.generate(photos[n])) for n in PHOTOS])
        matched, median = float((ious >= 0.9).mean()), float(np.median(ious))
        print(f"{mode.name} vs segment-anything: {len(ious)} masks, {matched:.1%} matched at IoU >= 0.9, "
              f"median best IoU {median:.4f}")
    # one decoder batch per photo, through the factored decoder exactly when the mode asks for it
    assert len(calls) == (len(PHOTOS) if decoder == "auto" else 0)
    assert len(ious) >= 15
    assert matched >= 0.99 and median >= 0.99, (matched, median)


# --- moving a filter before upsampling is seen -----------------------------------------------------------


def test_stability_moved_before_upsampling_changes_the_records(mobile, photos):
    """The stability score on the low-res logits differs from segment-anything's (on the upsampled ones):
    at a threshold between the two scores of one mask, the moved filter gives other records, and exact
    mode (which must not move it) still gives segment-anything's."""
    from segment_anything import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import calculate_stability_score

    from sam_sparse.maskgen import EXACT, AutomaticMaskGenerator, adapter_for

    image = photos["coffee"]
    adapter = adapter_for(mobile)
    with torch.inference_mode():
        [emb] = adapter.embed([adapter.prepare(image)])
        coords = adapter.prompt_coords(AutomaticMaskGenerator(mobile, **SETTINGS).point_grids[0]
                                       * np.array(image.shape[:2])[None, ::-1], image.shape[:2])
        low, iou = adapter.decode(emb, coords[:, None, :], torch.ones(len(coords), 1, dtype=torch.int))
        low, iou = low.flatten(0, 1), iou.flatten(0, 1)
        low = low[iou > 0.88]
        upsampled = calculate_stability_score(adapter.upsample(low, emb), 0.0, 1.0)
        low_res = calculate_stability_score(adapter.low_res_view(low, emb), 0.0, 1.0)
    gaps = sorted(((u - r).abs().item(), (u + r).item() / 2) for u, r in zip(upsampled, low_res))
    moved = dataclasses.replace(EXACT, name="moved", stability_on="low_res")
    for _, threshold in reversed(gaps[-5:]):  # the masks whose two scores differ most
        settings = dict(SETTINGS, stability_score_thresh=threshold)
        with torch.inference_mode():
            ref = SamAutomaticMaskGenerator(mobile, **settings).generate(image)
        wrong = AutomaticMaskGenerator(mobile, moved, **settings).generate(image)
        if [fields(r) for r in wrong] != [fields(r) for r in ref]:
            break
    else:
        pytest.fail("no threshold where the moved filter changes the records: the test cannot see the move")
    assert_same_records(AutomaticMaskGenerator(mobile, "exact", **settings).generate(image), ref, "exact")


# --- the generator's other entry points ----------------------------------------------------------------


def test_generate_many_reads_ahead_in_order_and_reports_bad_items(mobile, photos, references):
    from sam_sparse.maskgen import AutomaticMaskGenerator

    def load(item):
        if item == "broken":
            raise ValueError("cannot be read")
        return photos[item]

    results = list(AutomaticMaskGenerator(mobile, "exact", **SETTINGS).generate_many(
        ["coffee", "broken", "astronaut"], load=load))
    assert [r.item for r in results] == ["coffee", "broken", "astronaut"]
    assert isinstance(results[1].error, ValueError) and results[1].records is None
    assert_same_records(results[0].records, references["coffee"], "coffee")
    assert_same_records(results[2].records, references["astronaut"], "astronaut")


def test_bad_arguments_are_refused_with_what_is_accepted(mobile):
    from sam_sparse.maskgen import AutomaticMaskGenerator, GeneratorSettings, Mode

    with pytest.raises(ValueError, match="points_per_side=0: expected an integer >= 1"):
        GeneratorSettings(points_per_side=0)
    with pytest.raises(ValueError, match="pred_iou_thresh=1.5: expected a number from 0 to 1"):
        GeneratorSettings(pred_iou_thresh=1.5)
    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(ValueError, match="stability_score_offset=.*: expected a finite number"):
            GeneratorSettings(stability_score_offset=bad)
    with pytest.raises(ValueError, match="stability_on='full'"):
        Mode("m", stability_on="full")
    with pytest.raises(ValueError, match="low_res_margin: a prefilter for stability_on='upsampled' only"):
        Mode("m", stability_on="low_res", low_res_margin=0.1)
    with pytest.raises(ValueError, match="upsample='gpu': expected one of model, fused, auto"):
        Mode("m", upsample="gpu")
    with pytest.raises(ValueError, match="mode='quick': expected one of exact, fast"):
        AutomaticMaskGenerator(mobile, "quick")
    with pytest.raises(ValueError, match="use_m2m: SAM 2 generator parameters"):
        AutomaticMaskGenerator(mobile, use_m2m=True)
    with pytest.raises(ValueError, match="output_mode='png'"):
        AutomaticMaskGenerator(mobile, output_mode="png")
    with pytest.raises(ValueError, match="expected a non-empty HxWx3 uint8 RGB array"):
        AutomaticMaskGenerator(mobile).generate(np.zeros((10, 10), np.uint8))
    with pytest.raises(TypeError, match="expected a segment-anything Sam, a sam2 SAM2Base"):
        AutomaticMaskGenerator(torch.nn.Linear(2, 2))


# --- SAM 2: sam2's SAM2AutomaticMaskGenerator -------------------------------------------------------------


@pytest.fixture(scope="module")
def sam2_model():
    pytest.importorskip("sam2", reason="sam2 is an optional dependency (pip install sam2)")
    from sam2.build_sam import build_sam2

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cpu").eval()
    with torch.no_grad():  # random weights give logits within +-1: scaled, masks vary in stability
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
    model.memo = memoize(model)
    return model


# Random weights: predicted IoUs ~0.47-0.55, stability ~0.35-0.72, every box the whole image (so NMS at
# 0.7 would keep one mask; at 1.0 it keeps all, still ordered by score).
SAM2_CASES = {
    "grid": dict(points_per_side=4, points_per_batch=6, pred_iou_thresh=0.51, stability_score_thresh=0.6,
                 box_nms_thresh=1.0, mask_threshold=0.5),
    "m2m, one mask per point": dict(points_per_side=4, points_per_batch=6, pred_iou_thresh=0.5,
                                    stability_score_thresh=0.5, box_nms_thresh=1.0, use_m2m=True,
                                    multimask_output=False),
}


@pytest.mark.parametrize("case", SAM2_CASES)
def test_sam2_exact_mode_gives_sam2s_records(sam2_model, photos, case):
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from sam_sparse.maskgen import AutomaticMaskGenerator

    image = photos["astronaut"]
    with torch.inference_mode():
        ref = SAM2AutomaticMaskGenerator(sam2_model, **SAM2_CASES[case]).generate(image)
    ours = AutomaticMaskGenerator(sam2_model, "exact", **SAM2_CASES[case]).generate(image)
    assert len(ref) >= 5, f"{len(ref)} masks: too few to compare"
    assert len({r["predicted_iou"] for r in ref}) == len(ref)  # distinct masks, not one repeated
    assert_same_records(ours, ref, case)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_no_mask_in_any_crop_gives_no_records(sam2_model, photos, mode):
    """With crop layers and no mask kept anywhere (every predicted IoU under the threshold), generate returns no
    records; sam2's own generator (and segment-anything's, built alike) fails there computing box areas of no
    boxes."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from sam_sparse.maskgen import AutomaticMaskGenerator

    settings = dict(points_per_side=2, crop_n_layers=1, pred_iou_thresh=1.0)
    with pytest.raises(IndexError), torch.inference_mode():
        SAM2AutomaticMaskGenerator(sam2_model, **settings).generate(photos["astronaut"])
    assert AutomaticMaskGenerator(sam2_model, mode, **settings).generate(photos["astronaut"]) == []


@pytest.mark.parametrize("case", SAM2_CASES)
def test_sam2_factored_decoder_keeps_sam2s_masks(sam2_model, photos, case):
    """Mode(decoder="factored") on SAM 2 (its object-score token, high-resolution features, one-mask choice
    by stability; the mask-to-mask pass keeps the model's decoder): every one of sam2's masks found again
    at IoU >= 0.9."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from sam_sparse.maskgen import FAST, AutomaticMaskGenerator, with_changes

    image = photos["astronaut"]
    with torch.inference_mode():
        ref = SAM2AutomaticMaskGenerator(sam2_model, **SAM2_CASES[case]).generate(image)
    generator = AutomaticMaskGenerator(sam2_model, with_changes(FAST, decoder="factored"), **SAM2_CASES[case])
    calls = count_factored_calls(generator)
    ours = generator.generate(image)
    assert calls, "the factored decoder never ran"
    assert len(ref) >= 5, f"{len(ref)} masks: too few to compare"
    ious = best_ious(ref, ours)
    assert (ious >= 0.9).all(), ious


def test_sam2_fused_upsampling_gives_sam2s_records_or_says_why_not(sam2_model, photos, monkeypatch):
    """SAM 2 resizes in one bilinear step: Mode(upsample="fused") on the torch path gives sam2's records.
    With min_mask_region_area > 0 its predictor fills holes first: "fused" is refused, "auto" falls back."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from sam_sparse.maskgen import EXACT, AutomaticMaskGenerator, with_changes

    calls = count_fused_calls(monkeypatch)
    image = photos["astronaut"]
    with torch.inference_mode():
        ref = SAM2AutomaticMaskGenerator(sam2_model, **SAM2_CASES["grid"]).generate(image)
    ours = AutomaticMaskGenerator(sam2_model, with_changes(EXACT, upsample="fused"), **SAM2_CASES["grid"]).generate(image)
    assert {"resized_stats", "resized_masks"} <= set(calls), calls
    assert_same_records(ours, ref, "SAM 2, fused upsampling")
    with pytest.raises(ValueError, match="fills holes and removes sprinkles"):
        AutomaticMaskGenerator(sam2_model, with_changes(EXACT, upsample="fused"), min_mask_region_area=10)
    assert not AutomaticMaskGenerator(sam2_model, with_changes(EXACT, upsample="auto"), min_mask_region_area=10).fused_upsample


# --- predict: SamPredictor.predict / SAM2ImagePredictor.predict -------------------------------------------


def test_prompt_encoding_gives_segment_anythings_bits(mobile):
    """SamAdapter.encode_prompts (no boolean-mask indexing) against segment-anything's PromptEncoder on
    random points with every label (-1, 0, 1), with and without boxes and masks: equal bits."""
    from sam_sparse.maskgen import SamAdapter

    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    adapter, encoder = SamAdapter(mobile), mobile.prompt_encoder
    coords = torch.rand(5, 3, 2, generator=g, dtype=torch.float64) * 1024
    labels = torch.randint(-1, 2, (5, 3), generator=g, dtype=torch.int)
    boxes = torch.rand(5, 4, generator=g) * 1024
    masks = torch.randn(5, 1, 256, 256, generator=g)
    with torch.inference_mode():
        for points, b, m in (((coords, labels), None, None), ((coords.float(), labels), boxes, masks),
                             (None, boxes, None), (None, None, masks), ((coords[:1], labels[:1]), None, None)):
            ours, theirs = adapter.encode_prompts(points, b, m), encoder(points=points, boxes=b, masks=m)
            for a, t in zip(ours, theirs):
                assert a.shape == t.shape and a.dtype == t.dtype and torch.equal(a, t), f"seed {seed}"


# --- predict: SamPredictor.predict / SAM2ImagePredictor.predict -------------------------------------------


def predict_cases(size):
    h, w = size
    rng = np.random.default_rng(0)
    point, box = np.array([[w * 0.5, h * 0.4]]), np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])
    return [dict(point_coords=point, point_labels=np.array([1])),
            dict(point_coords=np.array([[w * 0.5, h * 0.4], [w * 0.1, h * 0.1]]), point_labels=[1, 0],
                 multimask_output=False),
            dict(box=box, return_logits=True),
            dict(point_coords=point, point_labels=np.array([1]), box=box,
                 mask_input=rng.normal(size=(1, 256, 256)).astype(np.float32))]


def assert_same_arrays(ours, ref, what):
    for name, a, b in zip(("masks", "scores", "low-res logits"), ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert np.array_equal(a, b), f"{what}: {name} differ"


def test_predict_on_device_gives_sampredictors_results(mobile, photos):
    from segment_anything import SamPredictor

    from sam_sparse.predictor import DevicePredictor, predict_on_device

    predictor = SamPredictor(mobile)
    predictor.set_image(photos["coffee"])
    graphed = DevicePredictor(predictor, cuda_graph=True)  # on the CPU: the eager path
    for case in predict_cases(photos["coffee"].shape[:2]):
        ref = predictor.predict(**case)
        assert_same_arrays(predict_on_device(predictor, **case), ref, str(sorted(case)))
        assert_same_arrays(graphed.predict(**case), ref, str(sorted(case)))
    predictor.reset_image()
    with pytest.raises(RuntimeError, match="An image must be set"):
        predict_on_device(predictor, point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))


def test_device_predictor_set_image_gives_the_predictors_features(mobile, sam2_model, photos):
    """DevicePredictor.set_image (on the CPU: no graph) sets what set_image_on_device / SAM2ImagePredictor.
    set_image set: the same features, sizes and flags."""
    from segment_anything import SamPredictor
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from sam_sparse import set_image_on_device
    from sam_sparse.predictor import DevicePredictor

    image = photos["coffee"]
    ours, ref = SamPredictor(mobile), SamPredictor(mobile)
    DevicePredictor(ours, cuda_graph=True).set_image(image)
    set_image_on_device(ref, image)
    assert torch.equal(ours.features, ref.features) and ours.is_image_set
    assert (ours.original_size, ours.input_size) == (ref.original_size, ref.input_size)
    ours, ref = SAM2ImagePredictor(sam2_model), SAM2ImagePredictor(sam2_model)
    DevicePredictor(ours).set_image(image)
    ref.set_image(image)
    assert ours._is_image_set and ours._orig_hw == ref._orig_hw
    for a, b in zip([ours._features["image_embed"], *ours._features["high_res_feats"]],
                    [ref._features["image_embed"], *ref._features["high_res_feats"]]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="takes RGB images"):
        DevicePredictor(ours).set_image(image, image_format="BGR")


def test_predict_on_device_gives_sam2s_results(sam2_model, photos):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from sam_sparse.predictor import predict_on_device

    predictor = SAM2ImagePredictor(sam2_model)
    predictor.set_image(photos["astronaut"])
    cases = predict_cases(photos["astronaut"].shape[:2])
    cases.append(dict(point_coords=np.array([[0.5, 0.5]]), point_labels=np.array([1]), normalize_coords=False))
    for case in cases:
        assert_same_arrays(predict_on_device(predictor, **case), predictor.predict(**case), str(sorted(case)))


# --- helpers ----------------------------------------------------------------------------------------------


def test_one_copy_transfers_keep_every_dtype_shape_and_value():
    from sam_sparse.maskgen.transfer import stage, to_device, to_host, views

    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    tensors = {"bool": torch.rand(3, 5, 7, generator=g) > 0.5, "int64": torch.randint(-9, 9, (5, 4), generator=g),
               "float32": torch.randn(3, generator=g), "float64": torch.randn(2, 3, generator=g, dtype=torch.float64),
               "empty": torch.zeros(0, 4), "int32": torch.randint(0, 9, (1,), generator=g, dtype=torch.int32)}
    host = to_host(tensors)
    for name, t in tensors.items():
        assert host[name].dtype == t.numpy().dtype and host[name].shape == tuple(t.shape), name
        assert np.array_equal(host[name], t.numpy()), f"{name}, seed {seed}"
    back = to_device(host, "cpu")
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)
    staged, layout = stage(host, pin=False)
    assert all(o % 512 == 0 for _, o, _, _, _ in layout)
    assert all(torch.equal(v, tensors[k]) for k, v in views(staged, layout).items())


@pytest.mark.parametrize("shape", [(0, 5, 7), (1, 1, 1), (3, 5, 7), (6, 33, 17)])
def test_mask_to_rle_matches_segment_anything(shape):
    from segment_anything.utils.amg import mask_to_rle_pytorch
    from segment_anything.utils.amg import rle_to_mask as sa_rle_to_mask

    from sam_sparse.maskgen import mask_to_rle, rle_to_mask

    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(shape, generator=g) > 0.5
    if shape[0] >= 3:
        masks[0] = False  # all background
        masks[1] = True  # all foreground: first count 0
        masks[2, :, :3] = True  # blocks of columns: long runs
    ours, theirs = mask_to_rle(masks), mask_to_rle_pytorch(masks)
    assert ours == theirs, f"seed {seed}"
    for rle, m in zip(ours, masks):
        assert np.array_equal(rle_to_mask(rle), sa_rle_to_mask(rle)), f"seed {seed}"
        assert np.array_equal(rle_to_mask(rle), m.numpy())


def test_prefetch_keeps_order_and_hands_over_expected_errors():
    import threading

    from sam_sparse.maskgen.prefetch import prefetch

    main = threading.get_ident()
    threads = set()

    def work(x):
        threads.add(threading.get_ident())
        if x == 3:
            raise OSError("unreadable")
        if x == 5:
            raise KeyError("a bug")
        return x * 10

    got = []
    with pytest.raises(KeyError, match="a bug"):  # not a `catch` type: raised when its turn comes
        for f in prefetch(range(7), work, depth=3):
            got.append((f.item, f.value, type(f.error).__name__ if f.error else None))
    assert got == [(0, 0, None), (1, 10, None), (2, 20, None), (3, None, "OSError"), (4, 40, None)]
    assert main not in threads  # the work ran on the worker
    with pytest.raises(ValueError, match="depth=0"):
        list(prefetch([1], work, depth=0))


def test_prompt_dependent_policy_sees_each_calls_prompts():
    """region_focused's decoder masks come from the call's prompts, which the prompt encoder's hook records;
    the adapter embeds prompts without calling the prompt encoder, so it records them itself: DevicePredictor
    gives SamPredictor.predict's arrays on the patched model (not the unpatched model's), also right after a
    lone prompt-encoder call with other prompts, and exact mode gives segment-anything's records."""
    from patch_helpers import make_image, small_sam
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    from sam_sparse import Policy, patch_sam
    from sam_sparse.maskgen import AutomaticMaskGenerator
    from sam_sparse.predictor import DevicePredictor

    focused = Policy.from_dict({"name": "rf", "block_size": 16, "rules": [
        {"match": ["decoder.token_to_image", "decoder.final_token_to_image"], "pattern": "region_focused",
         "params": {"radius": 1, "background_stride": 0}}, {"match": "*", "pattern": "dense"}]})
    image, sam = make_image(), small_sam()
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    prompt = dict(point_coords=np.array([[40, 40]]), point_labels=np.array([1]), return_logits=True)
    with torch.no_grad():
        unpatched = predictor.predict(**prompt)[0]
        handle = patch_sam(sam, focused)
        want = predictor.predict(**prompt)
        assert np.abs(want[0] - unpatched).max() > 1e-3, "the policy must change this prompt's logits"
        sam.prompt_encoder(points=(torch.tensor([[[250.0, 250.0]]]), torch.tensor([[1]])), boxes=None, masks=None)
        got = DevicePredictor(predictor).predict(**prompt)
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="normalize_coords=False: SAM 2's predictor only"):
            DevicePredictor(predictor).predict(**prompt, normalize_coords=False)
        settings = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        ref = SamAutomaticMaskGenerator(sam, **settings).generate(image)
        ours = AutomaticMaskGenerator(sam, "exact", **settings).generate(image)
    handle.restore()
    assert [(r["predicted_iou"], r["stability_score"]) for r in ours] == \
        [(r["predicted_iou"], r["stability_score"]) for r in ref]
