"""The command line with a SAM 2.1 model type: a random checkpoint in SAM 2's own released layout
({"model": state dict}, hiera_t, sharpened attention: tests/sam2_helpers.py) through convert, verify, segment,
calibrate and bench, on the CPU reference path at SAM 2's 1024 px (the CLI builds the released config).
No SAM 2 checkpoint can be downloaded here, so these check the plumbing and parity, not mask quality.
"""

import json

import pytest
import torch
from click.testing import CliRunner

from sam2_helpers import small_sam2
from sam_sparse.cli import main


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": small_sam2(image_size=1024, seed=11).state_dict()}, path)
    return path


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_convert_then_verify_the_converted_file(sam2_checkpoint, tmp_path):
    out = tmp_path / "tiny_local.safetensors"
    code, text = run("convert", "--checkpoint", sam2_checkpoint, "--policy", "local2d-30", "--out", out,
                     "--device", "cpu")
    assert code == 0, text
    assert "model sam2.1_hiera_t" in text and "encoder.global                 0.293" in text
    code, text = run("convert", "--checkpoint", sam2_checkpoint, "--policy", "dense", "--out", out)
    assert code == 2 and "already exists" in text
    code, text = run("convert", "--checkpoint", sam2_checkpoint, "--model-type", "sam2.1_hiera_l", "--policy",
                     "dense", "--out", tmp_path / "x.pt")
    assert code == 2 and "is for sam2.1_hiera_t" in text, text

    from sam_sparse import load_sparse_sam

    model = load_sparse_sam(out)
    assert type(model).__name__ == "SAM2Base" and model._sam_sparse_handle.policy.name == "local2d-30"


def test_verify_dense_passes(sam2_checkpoint):
    code, text = run("verify", "--checkpoint", sam2_checkpoint, "--model-type", "sam2.1_hiera_t", "--policy",
                     "dense", "--images", "astronaut", "--points", "250,120", "--device", "cpu")
    assert code == 0, text
    assert "DENSE_FP32: PASS" in text and "image_encoder.trunk.blocks.10.attn" in text


def test_verify_fails_a_policy_whose_sparse_layers_never_run(sam2_checkpoint):
    """memory-local makes only SAM 2's memory attention sparse, which an image comparison never runs: verify does
    not PASS a comparison in which nothing sparse ran; it names the kind and points to video parity."""
    code, text = run("verify", "--checkpoint", sam2_checkpoint, "--policy", "memory-local", "--images", "astronaut",
                     "--points", "250,120", "--single-mask", "--device", "cpu")
    assert code == 1, text
    assert "SPARSE: FAIL" in text and "no layer the policy makes sparse ran (4 of kind memory.cross)" in text, text
    assert "sam_sparse.video_parity" in text


def test_amg_manifest_names_a_converted_checkpoints_model(sam2_checkpoint, tmp_path):
    from PIL import Image
    from skimage import data

    converted = tmp_path / "tiny_dense.pt"
    code, text = run("convert", "--checkpoint", sam2_checkpoint, "--policy", "dense", "--out", converted)
    assert code == 0, text
    Image.fromarray(data.coffee()).resize((160, 120)).save(tmp_path / "coffee.png")
    out = tmp_path / "out"
    code, text = run("amg", tmp_path / "coffee.png", "--out", out, "--sparse-checkpoint", converted,
                     "--points-per-side", "2", "--device", "cpu")
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "sam2.1_hiera_t"
    assert manifest["weights"] == f"tiny_dense.pt ({converted.stat().st_size} bytes)"


def test_segment_with_points_and_boxes(sam2_checkpoint, tmp_path):
    out, masks = tmp_path / "seg.png", tmp_path / "masks.npy"
    code, text = run("segment", "astronaut", "--box", "100,50,400,300", "--box", "200,200,500,500",
                     "--checkpoint", sam2_checkpoint, "--out", out, "--save-masks", masks, "--device", "cpu")
    assert code == 0, text
    import numpy as np

    assert out.is_file() and np.load(masks).shape == (2, 512, 512)  # one mask per box


def test_calibrate_and_bench(sam2_checkpoint, tmp_path):
    out = tmp_path / "cal.yaml"
    code, text = run("calibrate", "--checkpoint", sam2_checkpoint, "--images", "coffee", "--target-density", "0.5",
                     "--layers", "encoder.global", "--out", out, "--device", "cpu")
    assert code == 0, text
    assert "image_encoder.trunk.blocks.5.attn" in text and out.is_file()
    code, text = run("policies", "check", out, "--model", "sam2.1_hiera_t")
    assert code == 0, text
    code, text = run("bench", "--model-type", "sam2.1_hiera_t", "--policy", "dense", "--device", "cpu",
                     "--warmup", "0", "--iters", "1")
    assert code == 0, text
    assert "sam2.1_hiera_t image encoder" in text and "CPU numbers" in text


def test_amg_with_a_sam2_checkpoint(sam2_checkpoint, tmp_path):
    """amg on a SAM 2 model runs SAM2AutomaticMaskGenerator's settings (predicted-IoU threshold 0.8 where none
    is given) through maskgen, and says so in the manifest."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.coffee()).resize((160, 120)).save(tmp_path / "coffee.png")
    out = tmp_path / "out"
    code, text = run("amg", tmp_path / "coffee.png", "--out", out, "--checkpoint", sam2_checkpoint,
                     "--points-per-side", "4", "--mode", "exact", "--output-mode", "coco_rle", "--device", "cpu")
    assert code == 0, text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == "sam2.1_hiera_t" and manifest["settings"]["pred_iou_thresh"] == 0.8
    assert manifest["summary"]["done"] == 1 and (out / "coffee.json").is_file()


def render_panels(tmp_path, name: str, rules: str) -> list:
    """`policies render` of a policy with these YAML rules on hiera_t: the panel lines it lists."""
    policy = tmp_path / f"{name}.yaml"
    policy.write_text(f"name: {name}\nblock_size: 32\ntoken_order: tiles\nrules:\n{rules}  - match: '*'\n    pattern: dense\n")
    png = tmp_path / f"{name}.png"
    code, text = run("policies", "render", policy, "--model", "sam2.1_hiera_t", "--out", png)
    assert code == 0 and png.stat().st_size > 0, text
    return [line.strip() for line in text.splitlines()]


def test_render_draws_each_stage_and_each_variant_of_a_kind(tmp_path):
    """Hiera's windows differ per stage, and a rule may pick some blocks of a kind: render draws every stage of a
    kind and each group of blocks whose masks differ (it once drew the first layer of each kind only: stage 1's
    windows for a rule on stage 3's)."""
    lines = render_panels(tmp_path, "stage3", "  - match: encoder.window\n    stages: [3]\n    heads: [0]\n"
                                              "    pattern: local2d\n    params: {radius: 1}\n")
    for n in (1, 2, 3, 4):
        assert any(line.startswith(f"encoder.window (stage {n}):") for line in lines), (n, lines)
    assert "encoder.window (stage 3): head 0: density 0.434" in lines, lines
    assert "encoder.window (stage 3): heads 1-3: density 1.000" in lines, lines
    lines = render_panels(tmp_path, "block5", "  - match: 're:image_encoder.trunk.blocks.5.attn'\n"
                                              "    pattern: local2d\n    params: {radius: 1}\n")
    assert any(line.startswith("encoder.global (stage 3) block 5: heads 0-3: density 0.") for line in lines), lines
    assert "encoder.global (stage 3) blocks 7, 9: heads 0-3: density 1.000" in lines, lines
