"""sam_sparse.maskgen and DevicePredictor on CUDA: what only a GPU can show.

- exact mode equals segment-anything's generator on the GPU too: there, upsampling a subset of masks
  must give each mask the bits it gets in the predictor's (B, 3, h, w) batch (CUDA's interpolate), and
  NMS runs on CUDA tensors;
- fast mode (1024-point decoder batches, the decoder taken apart: other float rounding) keeps >= 99% of
  the masks at IoU >= 0.9 at SAM's defaults on six photos, which makes it amg's default;
- DevicePredictor, eager and CUDA-graphed, returns SamPredictor.predict's arrays, also after a new image;
- SAM 2 (if sam2 is installed): exact mode equals SAM2AutomaticMaskGenerator on CUDA.

    TRITON_INTERPRET=0 python -m pytest -q -m gpu tests/gpu/test_gpu_maskgen.py
"""

import numpy as np
import pytest
import torch
from gpu_helpers import GPU_MARKS
from test_maskgen import SAM2_CASES, assert_same_arrays, assert_same_records, best_ious, photo, predict_cases

pytestmark = GPU_MARKS

SETTINGS = dict(points_per_side=16)


@pytest.fixture(scope="module")
def mobile():
    from sam_sparse import build_sam, fetch_mobile_sam, patch_sam

    model = build_sam("mobile_sam", fetch_mobile_sam(quiet=True), device="cuda")
    patch_sam(model, "dense")  # as `sam-sparse amg` runs it
    return model


@pytest.fixture(scope="module")
def photos():
    return {name: photo(name, side) for name, side in (("astronaut", 512), ("coffee", 600), ("chelsea", 451))}


@pytest.fixture(scope="module")
def references(mobile, photos):
    from segment_anything import SamAutomaticMaskGenerator

    with torch.inference_mode():
        return {n: SamAutomaticMaskGenerator(mobile, **SETTINGS).generate(img) for n, img in photos.items()}


@pytest.mark.parametrize("output_mode", ["binary_mask", "coco_rle"])
def test_exact_mode_gives_segment_anythings_records_on_cuda(mobile, photos, references, output_mode):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse.maskgen import AutomaticMaskGenerator

    generator = AutomaticMaskGenerator(mobile, "exact", output_mode=output_mode, **SETTINGS)
    for name, image in photos.items():
        ref = references[name]
        if output_mode != "binary_mask":
            with torch.inference_mode():
                ref = SamAutomaticMaskGenerator(mobile, output_mode=output_mode, **SETTINGS).generate(image)
        assert len(ref) > 0
        assert_same_records(generator.generate(image), ref, f"{name}, {output_mode}")


def test_exact_mode_with_a_crop_layer_on_cuda(mobile, photos):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse.maskgen import AutomaticMaskGenerator

    settings = dict(points_per_side=8, crop_n_layers=1)
    with torch.inference_mode():
        ref = SamAutomaticMaskGenerator(mobile, **settings).generate(photos["coffee"])
    assert len({tuple(r["crop_box"]) for r in ref}) > 1
    assert_same_records(AutomaticMaskGenerator(mobile, "exact", **settings).generate(photos["coffee"]), ref, "crops")


# SAM's defaults (32 x 32 points) on six of bench_amg's sample photos at their own sizes: 177 masks (run 45),
# so that one lost mask is 0.6%, under the rule's 1% (one of 3 photos' 50 at 16 x 16 points was 2%)
AGREEMENT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def test_fast_mode_agreement_on_cuda_decides_the_default(mobile, monkeypatch):
    """Issue 24's rule: amg's default is fast only where fast keeps >= 99% of segment-anything's masks at IoU
    >= 0.9 (median >= 0.99); else exact. The fast mode takes the decoder apart (decoder="auto"; a spy
    sees it) and upsamples with kernels.resize (upsample="auto"; another spy). Run 45 (H200, bench_amg's 20 photos): 99.54% of 1509 masks, median 1.0; these six: all
    177. A floor of 95% catches a broken fast mode either way."""
    from segment_anything import SamAutomaticMaskGenerator
    from skimage import data
    from test_maskgen import count_factored_calls, count_fused_calls

    from sam_sparse.cli.amg import DEFAULT_MODE
    from sam_sparse.maskgen import AutomaticMaskGenerator

    generator = AutomaticMaskGenerator(mobile, "fast")  # up to 1024 points per call, as free memory allows
    fused = count_fused_calls(monkeypatch)
    calls, ious = count_factored_calls(generator), []
    for name in AGREEMENT_PHOTOS:
        image = np.ascontiguousarray(getattr(data, name)()[..., :3])
        with torch.inference_mode():
            ref = SamAutomaticMaskGenerator(mobile).generate(image)
        ious.append(best_ious(ref, generator.generate(image)))
    ious = np.concatenate(ious)
    matched, median = float((ious >= 0.9).mean()), float(np.median(ious))
    print(f"fast vs segment-anything on CUDA: {len(ious)} masks, {matched:.2%} at IoU >= 0.9, median {median:.4f}")
    assert len(calls) >= len(AGREEMENT_PHOTOS)  # each photo's points through the factored decoder
    assert fused.count("resized_masks") >= len(AGREEMENT_PHOTOS)  # and its masks through kernels.resize
    assert len(ious) >= 150 and matched >= 0.95 and median >= 0.99, (len(ious), matched, median)
    assert DEFAULT_MODE == ("fast" if matched >= 0.99 else "exact"), (matched, DEFAULT_MODE)


def test_device_predictor_gives_sampredictors_arrays(mobile, photos):
    from segment_anything import SamPredictor

    from sam_sparse.predictor import DevicePredictor

    predictor = SamPredictor(mobile)
    eager, graphed = DevicePredictor(predictor), DevicePredictor(predictor, cuda_graph=True)
    for name in ("coffee", "astronaut"):  # the second image: the graphs copy in its features
        predictor.set_image(photos[name])
        for case in predict_cases(photos[name].shape[:2]):
            ref = predictor.predict(**case)
            assert_same_arrays(eager.predict(**case), ref, f"eager, {name}, {sorted(case)}")
            for _ in range(2):  # capture, then replay
                assert_same_arrays(graphed.predict(**case), ref, f"graph, {name}, {sorted(case)}")
    assert not graphed.graph_errors, graphed.graph_errors


@pytest.mark.parametrize("case", SAM2_CASES)
def test_sam2_exact_mode_on_cuda(photos, case):
    pytest.importorskip("sam2", reason="sam2 is an optional dependency (pip install sam2)")
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from sam2.build_sam import build_sam2

    from sam_sparse.maskgen import AutomaticMaskGenerator

    torch.manual_seed(0)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", None, device="cuda").eval()
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(30.0)
    image = photo("astronaut", 160)
    with torch.inference_mode():
        ref = SAM2AutomaticMaskGenerator(model, **SAM2_CASES[case]).generate(image)
    assert len(ref) >= 5
    assert_same_records(AutomaticMaskGenerator(model, "exact", **SAM2_CASES[case]).generate(image), ref, case)


def test_fused_resize_on_decoder_logits_matches_torchs_resize(mobile, photos):
    """kernels.resize compiled, on MobileSAM's low-res logits for a 600 x 400 photo (256 -> 1024, the
    resized image's 1024 x 683 kept, -> 400 x 600) and on a crop's plan: counts, boxes and masks against
    torch's float32 interpolate, the model's own upsampling, whose float32 source positions the kernel
    shares (a float64 resize places a pixel up to ~1e-4 px elsewhere at these sizes, which moves logits
    of slope ~30 per pixel by more than float32 rounding). Pixels within 1e-4 of a threshold excepted
    (tests/test_resize_kernel.py's checks); printed: how many pixels differ at all."""
    from test_resize_kernel import check_masks, check_stats

    from sam_sparse.kernels import resized_masks, resized_stats
    from sam_sparse.kernels.reference import resize_reference
    from sam_sparse.maskgen import AutomaticMaskGenerator, adapter_for

    adapter = adapter_for(mobile)
    image = photos["coffee"]
    with torch.inference_mode():
        [emb] = adapter.embed([adapter.prepare(image)])
        points = AutomaticMaskGenerator(mobile, **SETTINGS).point_grids[0] * np.array(image.shape[:2])[None, ::-1]
        coords = adapter.prompt_coords(points, image.shape[:2])
        low, _ = adapter.decode(emb, coords[:, None, :], torch.ones(len(coords), 1, dtype=torch.int, device="cuda"))
        low = low.flatten(0, 1)[::4].float()  # 192 masks
        size, mid = adapter.resize_plan(emb)
        assert size == (400, 600) and mid == (1024, 1024, 683, 1024), (size, mid)
        torch.testing.assert_close(resize_reference(low[:8], size, mid), adapter.upsample(low[:8], emb), rtol=0, atol=0)
        for out_size, out_mid in ((size, mid), ((371, 529), (1024, 1024, 741, 1024))):
            plan = (out_size, out_mid)
            ref = resize_reference(low, out_size, out_mid).double()
            counts, boxes = resized_stats(low, out_size, 0.0, 1.0, out_mid)
            check_stats(counts, boxes, ref, 0.0, 1.0, 0, f"stats {plan}")
            masks = resized_masks(low, out_size, 0.0, out_mid)
            check_masks(masks, ref, 0.0, 0, f"masks {plan}")
            print(f"fused resize {plan}: {int((masks != (ref > 0)).sum())} of {masks.numel()} pixels differ from "
                  "torch's float32 resize")
