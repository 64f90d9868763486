"""sam-sparse amg on real MobileSAM weights and small scikit-image photos: outputs against segment-anything's
own SamAutomaticMaskGenerator, both output layouts decoded independently, resume, a corrupt image, the
batched encoder (--batch-images) against one image per forward, --mode fast, and torchrun with two CPU
processes (gloo) against one process. (The generator itself, sam_sparse.maskgen: tests/test_maskgen.py.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from amg_helpers import stub_generate
from sam_sparse.cli import main

SETTINGS = ["--points-per-side", "4", "--device", "cpu"]
PHOTOS = ("astronaut", "coffee", "chelsea")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    for i, name in enumerate(PHOTOS):
        img = getattr(data, name)()
        h, w = img.shape[:2]
        s = 160 / max(h, w)
        where = d / "sub" if i == 2 else d  # one in a subfolder: found recursively, named sub__chelsea
        Image.fromarray(img).resize((int(w * s), int(h * s))).save(where / f"{name}.png")
    return d


def amg(*args, mode="exact"):
    """The CLI's amg; mode None: the default (fast)."""
    return CliRunner().invoke(main, ["amg", *[str(a) for a in args], *SETTINGS, *(["--mode", mode] if mode else [])])


def same_files(a: Path, b: Path) -> bool:
    """The same file names with the same bytes (PNG masks and metadata.csv)."""
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def read_binary(folder: Path):
    rows = (folder / "metadata.csv").read_text().splitlines()
    masks = [np.asarray(Image.open(folder / f"{i}.png")) > 0 for i in range(len(rows) - 1)]
    return rows, masks


@pytest.fixture(scope="module")
def binary_run(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("amg") / "out"
    result = amg(photos, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_matches_segment_anythings_generator(photos, binary_run):
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse import build_sam, fetch_mobile_sam, patch_sam
    from sam_sparse.segment import load_image

    model = build_sam("mobile_sam", fetch_mobile_sam(quiet=True))
    patch_sam(model, "dense")
    generator = SamAutomaticMaskGenerator(model, points_per_side=4)
    for image, name in ((photos / "coffee.png", "coffee"), (photos / "sub" / "chelsea.png", "sub__chelsea")):
        with torch.inference_mode():
            expected = generator.generate(load_image(image))
        rows, masks = read_binary(binary_run / name)
        assert rows[0].startswith("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x")
        assert len(masks) == len(expected) > 0
        for i, (m, e) in enumerate(zip(masks, expected)):
            assert np.array_equal(m, e["segmentation"])
            fields = rows[i + 1].split(",")
            assert int(fields[1]) == e["area"] == int(m.sum())
            assert [float(x) for x in fields[2:6]] == e["bbox"]
            assert float(fields[8]) == pytest.approx(e["predicted_iou"])
    manifest = json.loads((binary_run / "manifest.json").read_text())
    assert manifest["summary"] == {"done": 3, "skipped": 0, "failed": 0, "pending": 0}
    assert manifest["policy"] == "dense" and all(r["masks"] > 0 for r in manifest["images"])


def test_coco_rle_decodes_to_the_binary_masks(photos, binary_run, tmp_path):
    from pycocotools import mask as mask_utils
    from segment_anything.utils.amg import area_from_rle, mask_to_rle_pytorch, rle_to_mask

    out = tmp_path / "rle"
    result = amg(photos / "coffee.png", "--out", out, "--output-mode", "coco_rle")
    assert result.exit_code == 0, result.output
    records = json.loads((out / "coffee.json").read_text())
    _, binary = read_binary(binary_run / "coffee")
    assert len(records) == len(binary)
    for r, m in zip(records, binary):
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        decoded = mask_utils.decode(rle).astype(bool)
        assert np.array_equal(decoded, m)
        plain = mask_to_rle_pytorch(torch.from_numpy(decoded)[None])[0]  # segment-anything's own helpers
        assert np.array_equal(rle_to_mask(plain), m) and area_from_rle(plain) == r["area"]


def test_resume_skips_complete_and_redoes_partial(photos, tmp_path, monkeypatch):
    from sam_sparse.amg import AutomaticMaskGenerator

    monkeypatch.setattr(AutomaticMaskGenerator, "generate", stub_generate)  # which images run matters here, not their masks
    out = tmp_path / "out"
    assert amg(photos, "--out", out).exit_code == 0
    before = (out / "astronaut" / "metadata.csv").stat().st_mtime_ns
    # A run killed while writing coffee: its output was never renamed into place.
    (out / "coffee").rename(out / ".coffee.tmp-12345")
    result = amg(photos, "--out", out)
    assert result.exit_code == 0, result.output
    assert "1 done, 2 skipped" in result.stdout
    assert (out / "coffee" / "metadata.csv").is_file() and not (out / ".coffee.tmp-12345").exists()
    assert (out / "astronaut" / "metadata.csv").stat().st_mtime_ns == before
    again = amg(photos, "--out", out, "--overwrite")
    assert "3 done, 0 skipped" in again.stdout


def test_a_corrupt_image_is_recorded_and_the_run_goes_on(photos, tmp_path):
    listing = tmp_path / "list.txt"
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    listing.write_text(f"{photos / 'coffee.png'}\nbroken.jpg\n# a comment\n")
    out = tmp_path / "out"
    result = amg(listing, "--out", out)
    assert result.exit_code == 3, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"] == {"done": 1, "skipped": 0, "failed": 1, "pending": 0}
    failed = [r for r in manifest["images"] if r["status"] == "failed"]
    assert failed[0]["image"].endswith("broken.jpg") and "cannot be read as an image" in failed[0]["error"]


def test_batched_encoder_writes_the_same_bytes(photos, binary_run, tmp_path):
    # 3 images in batches of 2: one full batch and a short last one. MobileSAM's encoder on CPU in
    # float32 gives each image of a batch the bits it gets alone, so the outputs are byte-identical.
    out = tmp_path / "batched"
    result = amg(photos, "--out", out, "--batch-images", "2")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["batch_images"] == 2 and manifest["summary"] == {"done": 3, "skipped": 0, "failed": 0, "pending": 0}
    for name in ("astronaut", "coffee", "sub__chelsea"):
        assert same_files(out / name, binary_run / name), name


def test_a_corrupt_image_in_a_batch_fails_alone(photos, binary_run, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'coffee.png'}\nbroken.jpg\n{photos / 'astronaut.png'}\n")
    out = tmp_path / "out"
    result = amg(listing, "--out", out, "--batch-images", "3")
    assert result.exit_code == 3, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"] == {"done": 2, "skipped": 0, "failed": 1, "pending": 0}
    failed = [r for r in manifest["images"] if r["status"] == "failed"]
    assert failed[0]["image"].endswith("broken.jpg") and "cannot be read as an image" in failed[0]["error"]
    assert same_files(out / "coffee", binary_run / "coffee") and same_files(out / "astronaut", binary_run / "astronaut")


def test_crop_layers_embed_each_crop_even_with_batch_images(photos, tmp_path):
    out = tmp_path / "crops"
    result = amg(photos / "coffee.png", "--out", out, "--batch-images", "2", "--crop-n-layers", "1")
    assert result.exit_code == 0, result.output
    assert "--batch-images 2 has no effect with --crop-n-layers 1" in result.stderr
    crop_boxes = {line.split(",", 10)[-1] for line in (out / "coffee" / "metadata.csv").read_text().splitlines()[1:]}
    assert len(crop_boxes) > 1  # masks from the crops too, not only from the whole image


def test_fast_mode_is_the_default_and_is_recorded(photos, binary_run, tmp_path):
    """fast is the default (on the H200 it kept every one of segment-anything's masks on the 20 sample
    photos: issue 24's rule); the run says so in its manifest and finds every exact mask again."""
    out = tmp_path / "default"
    result = amg(photos / "coffee.png", "--out", out, mode=None)
    assert result.exit_code == 0 and "mode fast" in result.stderr, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "fast" and manifest["summary"] == {"done": 1, "skipped": 0, "failed": 0, "pending": 0}
    rows, masks = read_binary(out / "coffee")
    _, exact = read_binary(binary_run / "coffee")
    assert len(masks) > 0 and len(exact) > 0
    for m in exact:  # each exact mask found again (agreement is measured in tests/test_maskgen.py)
        assert max((m & f).sum() / max((m | f).sum(), 1) for f in masks) >= 0.9
    out = tmp_path / "exact"
    result = amg(photos / "coffee.png", "--out", out, mode="exact")
    assert result.exit_code == 0 and "mode exact" in result.stderr, result.output
    assert json.loads((out / "manifest.json").read_text())["mode"] == "exact"
    assert same_files(out / "coffee", binary_run / "coffee")


def test_bad_arguments_exit_2_before_the_model_loads(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in ((empty, "--out", tmp_path / "o"), (tmp_path / "missing", "--out", tmp_path / "o"),
                 (empty, "--out", tmp_path / "no" / "o")):
        result = amg(*args)
        assert result.exit_code == 2 and "error:" in result.stderr, result.output
        assert "Using the built-in default model" not in result.stderr
    (tmp_path / "a.png").write_bytes(b"")
    for n in ("0", "-1", "two"):
        result = amg(tmp_path / "a.png", "--out", tmp_path / "o", "--batch-images", n)
        assert result.exit_code == 2 and "--batch-images" in result.stderr, result.output
    result = amg(tmp_path / "a.png", "--out", tmp_path / "o", mode="quick")
    assert result.exit_code == 2 and "--mode" in result.stderr and "exact" in result.stderr, result.output


def test_torchrun_two_processes_match_one(photos, binary_run, tmp_path):
    out = tmp_path / "two"
    out.mkdir()
    (out / "manifest.rank5.json").write_text('{"run_id": "an earlier, larger job", "rank": 5}')  # removed at the end
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "sam_sparse", "amg", str(photos), "--out", str(out), *SETTINGS, "--mode", "exact"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["summary"] == {"done": 3, "skipped": 0, "failed": 0, "pending": 0}
    assert manifest["finished"] and not list(out.glob("manifest.rank*.json"))
    for name in ("astronaut", "coffee", "sub__chelsea"):
        rows_two, masks_two = read_binary(out / name)
        rows_one, masks_one = read_binary(binary_run / name)
        assert len(masks_two) == len(masks_one) and all(np.array_equal(a, b) for a, b in zip(masks_two, masks_one))
        # The same numbers up to float rounding: the processes run single-threaded CPU matmuls, this
        # test process multi-threaded ones, which sum in another order.
        for a, b in zip(rows_two[1:], rows_one[1:]):
            assert np.allclose([float(x) for x in a.split(",")], [float(x) for x in b.split(",")], rtol=1e-5, atol=0)
