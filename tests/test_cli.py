"""The sam-sparse command line, on the real MobileSAM (fetched once into the user cache)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sam_sparse import convert as convert_module
from sam_sparse.cli import main
from sam_sparse.models import build_sam, fetch_mobile_sam, load_sparse_sam, read_sparse_checkpoint
from sam_sparse.patches import patch_sam
from sam_sparse.policy import load_policy

POLICY = "region_focused"  # the built-in policy that makes MobileSAM's (decoder) attention sparse


@pytest.fixture(scope="module")
def ckpt():
    return fetch_mobile_sam()


@pytest.fixture(scope="module")
def work(tmp_path_factory, ckpt):
    """A folder with a private copy of MobileSAM's checkpoint (tests may try to damage it)."""
    d = tmp_path_factory.mktemp("cli")
    shutil.copy(ckpt, d / "mobile_sam.pt")
    return d


@pytest.fixture(scope="module")
def converted(work):
    out = work / "converted.pt"
    result = CliRunner().invoke(main, ["convert", "--checkpoint", str(work / "mobile_sam.pt"), "--policy", POLICY,
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _error_line(result):
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def _decode(model, seed=0):
    """Mask decoder outputs for a fixed random image embedding and a box + point prompt (cheap)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 256, 64, 64, generator=g)
    points = (torch.tensor([[[500.0, 400.0]]]), torch.ones(1, 1, dtype=torch.int))
    boxes = torch.tensor([[300.0, 200.0, 700.0, 650.0]])
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
        return model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=True)


# ---------------------------------------------------------------------------------------------------
# the console script and --help
# ---------------------------------------------------------------------------------------------------


def _console_script() -> Path:
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        exe = folder / "sam-sparse"
        if exe.exists():
            return exe
    pytest.fail("the sam-sparse console script is not installed next to this Python (pip install -e .)")


def test_console_script_runs():
    exe = _console_script()
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for command in ("demo", "segment", "verify", "convert", "bench", "fetch", "policies"):
        assert command in out.stdout
    out = subprocess.run([str(exe), "fetch", "mobile_sam"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == fetch_mobile_sam()


@pytest.mark.parametrize("command", ["demo", "segment", "verify", "convert", "bench", "fetch"])
def test_help_shows_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and f"sam-sparse {command}" in result.output


# ---------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------


def test_convert_round_trip(converted, work, ckpt):
    manifest, _ = read_sparse_checkpoint(converted)
    assert manifest["model_type"] == "mobile_sam" and manifest["dtype"] == "fp32"
    assert manifest["policy_name"] == POLICY and "rules:" in manifest["policy"]
    assert manifest["source_sha256"] == "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f"

    loaded = load_sparse_sam(converted)
    assert loaded._sam_sparse_handle.policy.name == POLICY
    reference = build_sam("mobile_sam", ckpt)
    patch_sam(reference, POLICY)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for a, b in zip(_decode(loaded), _decode(reference)):
        assert torch.equal(a, b)


def test_convert_safetensors_bf16_and_mode_from_manifest(work):
    out = work / "named_like_dense.bin"  # the file name says nothing; the manifest decides
    result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", "local2d-30", "--out", out,
                 "--format", "safetensors", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    assert "7 attention modules patched" in result.stdout and "bf16" in result.stdout
    model = load_sparse_sam(out, dtype=None)  # as stored
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model._sam_sparse_handle.policy.name == "local2d-30"
    # By default, float32 compute: what SamPredictor needs, so a half-precision file just works.
    from segment_anything import SamPredictor

    model = load_sparse_sam(out)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    predictor = SamPredictor(model)
    with torch.inference_mode():
        predictor.set_image(np.zeros((64, 64, 3), dtype=np.uint8))
        masks, _, _ = predictor.predict(point_coords=np.array([[32.0, 32.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 64, 64)
    seg = run("segment", "horse", "--box", "13,4,393,317", "--sparse-checkpoint", out, "--out", work / "horse.png")
    assert seg.exit_code == 0, seg.output
    assert "stores bfloat16 weights; running them in float32" in seg.stderr


def test_convert_format_follows_the_file_name(work, tmp_path):
    """No --format: a .safetensors name gets safetensors bytes, and the file loads as a user loads it."""
    out = tmp_path / "out.safetensors"
    result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", "dense", "--out", out)
    assert result.exit_code == 0, result.output
    head = out.read_bytes()[:9]
    assert head[8:9] == b"{", "expected a safetensors header"
    assert load_sparse_sam(out)._sam_sparse_handle.policy.name == "dense"
    check = run("verify", "--sparse-checkpoint", out, "--images", "horse")
    assert check.exit_code == 0, check.output
    for fmt, name in (("torch", "x.safetensors"), ("safetensors", "x.pt")):
        bad = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", "dense", "--out", tmp_path / name,
                  "--format", fmt)
        assert bad.exit_code == 2 and "the name says" in _error_line(bad), bad.output
        assert not (tmp_path / name).exists()


def test_loader_reads_the_bytes_not_the_name(work, tmp_path):
    from sam_sparse.models import load_checkpoint

    odd = tmp_path / "torch_bytes.safetensors"
    shutil.copy(work / "mobile_sam.pt", odd)
    assert set(load_checkpoint(odd)) == set(load_checkpoint(work / "mobile_sam.pt"))


def test_convert_refuses_to_overwrite(converted, work):
    out = work / "exists.pt"
    out.write_bytes(b"user data")
    result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", POLICY, "--out", out)
    assert result.exit_code == 2
    assert "already exists; pass --force" in _error_line(result)
    assert out.read_bytes() == b"user data"

    result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", POLICY, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert read_sparse_checkpoint(out)[0]["policy_name"] == POLICY


def test_convert_never_writes_over_its_input(work, ckpt):
    src = work / "mobile_sam.pt"
    os.link(src, work / "hardlink.pt")
    (work / "symlink.pt").symlink_to(src)
    for out in (src, work / "." / "mobile_sam.pt", work / "hardlink.pt", work / "symlink.pt"):
        result = run("convert", "--checkpoint", src, "--policy", POLICY, "--out", out, "--force")
        assert result.exit_code == 2, (out, result.output)
        assert "is the input checkpoint" in _error_line(result)
    assert src.read_bytes() == ckpt.read_bytes()


@pytest.mark.parametrize("existing", [False, True])
def test_convert_crash_mid_write_leaves_nothing_behind(work, ckpt, monkeypatch, existing):
    out_dir = work / f"crash-{existing}"
    out_dir.mkdir()
    out = out_dir / "out.pt"
    if existing:
        out.write_bytes(b"previous output")

    def crash(path, manifest, state_dict, fmt):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_module, "write_sparse_checkpoint", crash)
    result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", POLICY, "--out", out, "--force")
    assert result.exit_code == 1
    assert "No space left on device" in _error_line(result)
    assert (work / "mobile_sam.pt").read_bytes() == ckpt.read_bytes()
    assert [p.name for p in out_dir.iterdir()] == (["out.pt"] if existing else [])  # no temp file, no partial OUT
    if existing:
        assert out.read_bytes() == b"previous output"


def test_convert_killed_mid_write_leaves_input_and_output_alone(work, ckpt, tmp_path):
    """A real SIGKILL while writing: IN intact and no partial OUT (only the hidden temp file may remain)."""
    out = tmp_path / "out.pt"
    code = (
        "import os, signal, sys\n"
        "from sam_sparse import convert as c\n"
        "real = c.write_sparse_checkpoint\n"
        "def write(path, *a):\n"
        "    real(path, *a)\n"
        "    os.truncate(path, os.path.getsize(path) // 2)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "c.write_sparse_checkpoint = write\n"
        "from sam_sparse.cli import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["convert", "--checkpoint", str(work / "mobile_sam.pt"), "--policy", POLICY, "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert (work / "mobile_sam.pt").read_bytes() == ckpt.read_bytes()
    assert not out.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(p.name.startswith(".out.tmp-") and p.name.endswith(".pt") for p in leftovers)


@pytest.fixture(scope="module")
def bad_files(work, ckpt):
    """(file name in `work`, extra arguments, expected message) for each kind of bad checkpoint."""
    d = work
    raw = ckpt.read_bytes()
    (d / "empty.pt").write_bytes(b"")
    (d / "truncated.pt").write_bytes(raw[: len(raw) // 3])
    (d / "text.pt").write_text("not a checkpoint\n")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, d / "not_sam.pt")
    torch.save({"model": torch.nn.Linear(2, 2)}, d / "pickled.pt")
    return [
        ("missing.pt", [], "no such file"),
        ("empty.pt", [], "is empty"),
        ("truncated.pt", [], "truncated or corrupt"),
        ("text.pt", [], "not a PyTorch checkpoint"),
        ("list.pt", [], "not a state dict"),
        ("not_sam.pt", [], "not a SAM checkpoint"),
        ("pickled.pt", [], "Python objects"),
        ("mobile_sam.pt", ["--model-type", "vit_b"], "is for mobile_sam (TinyViT image encoder), not vit_b"),
    ]


def test_convert_bad_checkpoints(work, bad_files, tmp_path):
    for name, extra, message in bad_files:
        out = tmp_path / f"{name}.out"
        result = run("convert", "--checkpoint", work / name, "--policy", POLICY, "--out", out, *extra)
        assert result.exit_code == 2, (name, result.output)
        line = _error_line(result)
        assert message in line and str(work / name) in line, line
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_convert_bad_policy_and_converted_input(work, converted, tmp_path):
    result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", "no-such-policy", "--out",
                 tmp_path / "x.pt")
    assert result.exit_code == 2 and "no-such-policy" in _error_line(result)
    result = run("convert", "--checkpoint", converted, "--policy", POLICY, "--out", tmp_path / "x.pt")
    assert result.exit_code == 2 and "sam-sparse converted checkpoint" in _error_line(result)
    assert list(tmp_path.iterdir()) == []


def test_a_converted_safetensors_file_is_no_plain_checkpoint(work, tmp_path):
    """A converted file in safetensors format given where a released checkpoint goes (--checkpoint) is refused as
    the torch format is, not loaded as plain weights (its manifest's policy silently dropped, its dtype crashing
    the prompt encoder)."""
    st = work / "converted_bf16.safetensors"
    if not st.exists():
        result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", POLICY, "--out", st,
                     "--dtype", "bf16")
        assert result.exit_code == 0, result.output
    for args in (("segment", "astronaut", "--out", tmp_path / "o.png"), ("verify", "--policy", "dense"),
                 ("convert", "--policy", "dense", "--out", tmp_path / "x.pt")):
        result = run(*args, "--checkpoint", st)
        assert result.exit_code == 2, (args, result.output)
        assert "is a sam-sparse converted checkpoint" in _error_line(result) and "--sparse-checkpoint" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_half_precision_checkpoint_runs_in_float32(work, tmp_path):
    """A released-layout checkpoint saved in fp16 (or bf16): build_sam gives float32, as it does for any file, so
    the commands run it (they crashed in the prompt encoder: float input, half bias)."""
    half = tmp_path / "mobile_sam_fp16.pt"
    state = torch.load(work / "mobile_sam.pt", map_location="cpu", weights_only=True)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, half)
    model = build_sam(None, half)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float32}
    result = run("segment", "astronaut", "--point", "250,120", "--checkpoint", half, "--out", tmp_path / "o.png")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------------------------------
# verify, segment, demo, bench
# ---------------------------------------------------------------------------------------------------


def test_verify_passes_and_fails(work):
    base = ["verify", "--checkpoint", work / "mobile_sam.pt", "--policy", POLICY, "--images", "astronaut",
            "--points", "250,120", "--single-mask", "--device", "cpu"]
    ok = run(*base)
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.stdout and "| layer" in ok.stdout
    strict = run(*base, "--min-cosine", "0.9999")  # sparse decoder layers cannot be that close
    assert strict.exit_code == 1, strict.output
    assert "FAIL" in strict.stdout and "output cosine" in strict.stdout


def test_verify_sparse_checkpoint_and_bad_input(converted, work, bad_files):
    result = run("verify", "--sparse-checkpoint", converted, "--images", "chelsea", "--single-mask")
    assert result.exit_code == 0, result.output
    assert f"policy '{POLICY}'" in result.stdout
    bad = run("verify", "--checkpoint", work / "text.pt", "--policy", POLICY, "--images", "chelsea")
    assert bad.exit_code == 2 and "not a PyTorch checkpoint" in _error_line(bad)
    bad = run("verify", "--policy", POLICY, "--images", "chelsea", "--points", "5000,10")
    assert bad.exit_code == 2 and "outside" in _error_line(bad)


def test_segment_writes_png_and_masks(tmp_path):
    out, masks = tmp_path / "overlay.png", tmp_path / "masks.npy"
    result = run("segment", "astronaut", "--point", "250,120", "--out", out, "--save-masks", masks)
    assert result.exit_code == 0, result.output
    assert "Using the built-in default model: MobileSAM" in result.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (512, 512) and im.mode == "RGB"
    m = np.load(masks)
    assert m.shape == (1, 512, 512) and m.dtype == bool
    assert 0.01 < m.mean() < 0.2  # a face, not the whole picture
    assert m[0, 120, 250]


def test_segment_boxes_to_label_png(tmp_path, work):
    img = tmp_path / "coffee.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(img)  # any file works as IMAGE
    out, masks = tmp_path / "o.png", tmp_path / "labels.png"
    result = run("segment", img, "--box", "5,5,25,30", "--box", "30,5,55,35", "--out", out, "--save-masks", masks,
                 "--checkpoint", work / "mobile_sam.pt", "--policy", "dense")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("mask ") == 2
    with Image.open(masks) as im:
        assert im.size == (60, 40) and set(np.unique(np.asarray(im))) <= {0, 1, 2}
    bad = run("segment", "astronaut", "--point", "1,2,3", "--out", out)
    assert bad.exit_code == 2 and "expected 2 comma-separated numbers" in _error_line(bad)
    bad = run("segment", tmp_path / "nope.jpg", "--out", out)
    assert bad.exit_code == 2 and "no such file" in _error_line(bad)
    if not torch.cuda.is_available():
        bad = run("segment", "astronaut", "--out", out, "--device", "cuda")
        assert bad.exit_code == 2 and "CUDA is not available" in _error_line(bad)


def test_masks_a_label_png_cannot_hold_are_refused(tmp_path, monkeypatch):
    """--multimask's nested candidates into a label PNG: refused before the model loads; masks that overlap (boxes
    around one object) refused by save_masks before it writes anything, saying to use .npy, which keeps them."""
    from sam_sparse import segment as seg
    from sam_sparse.cli import common

    def no_model(*a, **k):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(common, "load_model", no_model)
    result = run("segment", "astronaut", "--point", "250,120", "--multimask", "--out", tmp_path / "o.png",
                 "--save-masks", tmp_path / "m.png")
    assert result.exit_code == 2 and "--multimask gives 3 nested candidate masks" in _error_line(result)
    masks = np.zeros((3, 8, 10), bool)
    masks[0, :4], masks[1, 4:], masks[2, 3:5, 2] = True, True, True  # mask 2 overlaps both at (3, 2), (4, 2)
    with pytest.raises(ValueError, match=r"mask 2 overlaps mask 0 \(of the masks before it, in 2 pixels\).*save them as .npy"):
        seg.save_masks(tmp_path / "m.png", masks)
    assert list(tmp_path.iterdir()) == []
    seg.save_masks(tmp_path / "m.npy", masks)
    assert np.array_equal(np.load(tmp_path / "m.npy"), masks)
    seg.save_masks(tmp_path / "m.png", masks[:2])
    with Image.open(tmp_path / "m.png") as im:
        assert np.array_equal(np.asarray(im), masks[0] * 1 + masks[1] * 2)


def test_fetch_says_which_weights_it_cannot_fetch():
    result = run("fetch", "sam2.1_hiera_t")
    assert result.exit_code == 2
    assert "fetches mobile_sam only" in _error_line(result) and "--checkpoint" in result.stderr


def test_default_device_comes_from_the_environment(tmp_path, monkeypatch):
    """$SAM_SPARSE_DEVICE sets the default device (tests pin it to cpu); a bad value is a one-line error
    naming the variable, found before the model loads."""
    from sam_sparse.devices import default_device

    monkeypatch.setenv("SAM_SPARSE_DEVICE", "cpu")
    assert default_device() == "cpu"
    monkeypatch.setenv("SAM_SPARSE_DEVICE", "tpu-ish")
    bad = run("segment", "astronaut", "--out", tmp_path / "m.png", "--checkpoint", tmp_path / "absent.pt")
    assert bad.exit_code == 2 and "$SAM_SPARSE_DEVICE 'tpu-ish': not a torch device" in _error_line(bad)
    monkeypatch.delenv("SAM_SPARSE_DEVICE")
    assert default_device() == ("cuda" if torch.cuda.is_available() else "cpu")


def test_segment_takes_background_points(tmp_path):
    """Issue 25, item 17: segment had no background points (SamPredictor's label 0)."""
    from segment_anything import SamPredictor

    from sam_sparse.segment import load_image

    masks = tmp_path / "m.npy"
    result = run("segment", "astronaut", "--point", "250,120", "--neg-point", "300,200", "--out", tmp_path / "o.png",
                 "--save-masks", masks, "--device", "cpu")
    assert result.exit_code == 0, result.output
    model = build_sam("mobile_sam", fetch_mobile_sam())
    patch_sam(model, "dense")
    predictor = SamPredictor(model)
    with torch.inference_mode():
        predictor.set_image(load_image("astronaut"))
        expected = {labels: predictor.predict(point_coords=np.array([[250.0, 120.0], [300.0, 200.0]]),
                                              point_labels=np.array(labels), multimask_output=False)[0][0]
                    for labels in ((1, 0), (1, 1))}
    got = np.load(masks)[0]
    assert np.array_equal(got, expected[(1, 0)]) and not np.array_equal(got, expected[(1, 1)])
    assert not got[200, 300]
    alone = run("segment", "astronaut", "--neg-point", "300,200", "--out", tmp_path / "o.png")
    assert alone.exit_code == 2 and "go with a --point or a --box" in _error_line(alone)
    outside = run("segment", "astronaut", "--point", "250,120", "--neg-point", "900,10", "--out", tmp_path / "o.png")
    assert outside.exit_code == 2 and "point 900,10 is outside the 512x512 image" in _error_line(outside)


def test_demo(tmp_path):
    from sam_sparse.cli.segment import DEFAULT_POLICY

    out = tmp_path / "demo.png"
    result = run("demo", "--out", out)
    assert result.exit_code == 0, result.output
    assert DEFAULT_POLICY == "dense"  # no sparse policy passes the quality bar on MobileSAM (docs/quality.md)
    assert f"policy '{DEFAULT_POLICY}'" in result.stdout and "PASS" in result.stdout
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (512, 512)


def test_bench_cpu_says_so_and_plots(tmp_path):
    plot = tmp_path / "bench.png"
    result = run("bench", "--model-type", "mobile_sam", "--policy", "dense", "--warmup", "0", "--iters", "1",
                 "--plot", plot, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "These are CPU numbers" in result.stdout
    assert "| original" in result.stdout and "| dense" in result.stdout
    assert "no image-encoder layer was patched" in result.stdout and "not timed" in result.stdout
    assert "x (" not in result.stdout  # no speedup for code that did not change
    assert "density (all encoder layers)" in result.stdout and "window layers included" in result.stdout
    with Image.open(plot) as im:
        assert im.format == "PNG"


def test_bench_says_what_it_will_run_before_timing(monkeypatch):
    """Issue 25, item 14: bench printed what it ran (model, runs, CPU numbers) only at the end."""
    import sam_sparse.bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sam_sparse.bench, "interleaved_runs", interrupted)
    result = run("bench", "--model-type", "mobile_sam", "--policy", "dense", "--policy", "region_focused",
                 "--iters", "2", "--device", "cpu")
    assert result.exit_code == 130 and result.stdout == "", result.output
    err = result.stderr
    assert "sam-sparse bench: mobile_sam image encoder (random weights), batch 1, fp32, cpu" in err
    assert "These are CPU numbers" in err and "warning: on a CPU one image encoder run takes" in err
    assert "mobile_sam: up to 9 runs follow" in err
    assert "plan: the original and 2 patched model(s) (dense, region_focused), 1 untimed + 2 timed round(s)" in err
    assert "timing 1 model(s): 3 encoder runs" in err and "region_focused: no image-encoder layer was patched" in err
    assert err.index("plan:") < err.index("timing") < err.index("error: interrupted")


def test_bench_compile_mode_is_validated():
    result = run("bench", "--compile-mode", "fastest", "--device", "cpu")
    assert result.exit_code == 2
    assert "'fastest' is not one of 'default', 'reduce-overhead'" in result.output
    from sam_sparse.bench import bench_encoder

    with pytest.raises(ValueError, match=r"compile_mode='fastest': expected one of default, reduce-overhead"):
        bench_encoder("vit_b", compile=True, compile_mode="fastest", device="cpu")


def test_outputs_are_checked_before_any_work(tmp_path):
    """A missing folder or a wrong suffix: exit 2 and one error line, before the model loads, nothing written."""
    cases = [
        ("segment", "horse", "--box", "13,4,393,317", "--out", tmp_path / "nodir" / "out.png"),
        ("segment", "horse", "--box", "13,4,393,317", "--out", tmp_path / "o.png", "--save-masks", tmp_path / "nodir" / "m.npy"),
        ("segment", "horse", "--out", tmp_path / "out.gif"),
        ("demo", "--out", tmp_path / "nodir" / "x.png"),
        ("bench", "--plot", tmp_path / "nodir" / "b.png", "--device", "cpu"),
    ]
    for args in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "does not exist" in _error_line(result) or "expected a file name ending in" in _error_line(result)
        assert "Using the built-in default model" not in result.stderr, "the model loaded before the check"
    assert list(tmp_path.iterdir()) == []


def test_point_outside_the_image_is_refused_before_the_model_loads(tmp_path):
    result = run("segment", "horse", "--point", "5000,10", "--out", tmp_path / "o.png")
    assert result.exit_code == 2 and "outside the 400x328 image" in _error_line(result)
    assert "Using the built-in default model" not in result.stderr


def test_segment_says_it_uses_the_centre_and_writes_jpeg(tmp_path):
    out = tmp_path / "o.jpg"
    result = run("segment", "horse", "--out", out, "--save-masks", tmp_path / "m.npy")
    assert result.exit_code == 0, result.output
    assert "using the image centre, --point 200,164" in result.stderr
    with Image.open(out) as im:
        assert im.format == "JPEG"
    assert np.load(tmp_path / "m.npy").dtype == bool
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npy", "o.jpg"]  # no temporary file left


def test_bench_interleaves_rounds_and_reports_spread():
    from sam_sparse.bench import BenchResult, BenchRow, interleaved_runs

    calls = []
    times = interleaved_runs([lambda: calls.append("a"), lambda: calls.append("b")], "cpu", 1, 2, lambda: None)
    assert calls == ["a", "b"] * 3 and [len(t) for t in times] == [2, 2]
    result = BenchResult("vit_b", "cpu", "fp32", 1, False)
    result.rows = [BenchRow("original", 1.0, [10.0, 12.0, 11.0]), BenchRow("sparse", 0.3, [5.0, 4.0, 11.0]),
                   BenchRow("decoder-only", 1.0, [])]
    assert result.speedup(result.rows[1]) == (2.0, 1.0, 3.0)
    table = result.table()
    assert "4.0 / 5.0 / 11.0" in table and "2.00x (1.00-3.00)" in table
    assert "not timed" in table and "same code as the original" in table


def test_policy_warnings_once_in_every_command(work, tmp_path):
    """local2d-30 changes nothing on MobileSAM: every command says so, once; region_focused: no warning."""
    mark = "leaves every patched layer of this model dense"
    runs = {
        "segment": run("segment", "horse", "--box", "13,4,393,317", "--policy", "local2d-30", "--out", tmp_path / "a.png"),
        "verify": run("verify", "--policy", "local2d-30", "--images", "horse"),
        "demo": run("demo", "--policy", "local2d-30", "--out", tmp_path / "d.png"),
        "convert": run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", "local2d-30",
                       "--out", tmp_path / "c.pt"),
    }
    for name, result in runs.items():
        assert result.exit_code == 0, (name, result.output)
        assert result.stderr.count(mark) == 1, (name, result.stderr)
    quiet = run("segment", "horse", "--box", "13,4,393,317", "--out", tmp_path / "b.png")
    assert quiet.exit_code == 0 and "warning:" not in quiet.stderr, quiet.stderr
    sparse_ckpt = run("segment", "horse", "--box", "13,4,393,317", "--sparse-checkpoint", tmp_path / "c.pt",
                      "--out", tmp_path / "e.png")
    assert sparse_ckpt.exit_code == 0 and sparse_ckpt.stderr.count(mark) == 1, sparse_ckpt.stderr


def test_version_and_mobile_sam_policies():
    from sam_sparse import __version__

    result = run("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"sam-sparse {__version__}"
    shown = run("policies", "show", "region_focused", "--model", "mobile_sam")
    assert shown.exit_code == 0, shown.output
    assert "decoder layers only" in shown.stdout and "image_encoder" not in shown.stdout.split("# token-level")[1]
    listed = run("policies", "list", "--model", "mobile_sam")
    assert listed.exit_code == 0 and "mobile_sam" in listed.stdout


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from sam_sparse.segment import load_image

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")
    rgb = load_image(tmp_path / "deep.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255 and 100 < rgb[..., 0].mean() < 155


def test_verify_failure_names_the_image_and_the_prompt():
    result = run("verify", "--policy", "region_focused", "--images", "horse", "--min-mask-iou", "1.0")
    assert result.exit_code == 1, result.output
    assert "horse, point 200,164 (the image centre): mask IoU" in result.stdout
    assert "<= inf" not in result.stdout


def test_policy_yaml_merge_keys_and_huge_numbers(tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text("name: merged\nrules:\n  - &r\n    match: encoder.global\n    pattern: local2d\n    params: {radius: 2}\n"
                      "  - <<: *r\n    match: encoder.window\n")
    ok = run("policies", "check", merged)
    assert ok.exit_code == 0, ok.output
    for params, field in (("{blocks: 100000000000000000000000}", "blocks"), ("{stride: 10000000000}", "stride")):
        pattern = "sink" if field == "blocks" else "dilated"
        huge = tmp_path / f"{field}.yaml"
        huge.write_text(f"name: huge\nrules:\n  - match: encoder.global\n    pattern: {pattern}\n    params: {params}\n")
        bad = run("policies", "check", huge)
        assert bad.exit_code == 2, bad.output
        assert f"{field}.yaml:5: rules[0].params.{field}:" in _error_line(bad) and "too large" in _error_line(bad)


# ---------------------------------------------------------------------------------------------------
# never a traceback (issue 25, item 6)
# ---------------------------------------------------------------------------------------------------


def test_ctrl_c_while_the_command_line_imports_is_one_line(tmp_path):
    """Item 6: Ctrl-C while `sam-sparse convert` was still importing printed a traceback."""
    script = textwrap.dedent("""
        import runpy, sys

        class CtrlC:  # the interrupt arrives while torch is being imported
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt

        sys.meta_path.insert(0, CtrlC())
        sys.argv = ["sam-sparse", "convert", "--checkpoint", "in.pt", "--policy", "dense", "--out", "out.pt"]
        from sam_sparse.cli import main  # what the sam-sparse console script runs
        main()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip() == "error: interrupted" and "Traceback" not in proc.stderr


def test_an_unexpected_error_is_one_line(monkeypatch, tmp_path):
    import sam_sparse.segment

    def boom(spec):
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")

    monkeypatch.setattr(sam_sparse.segment, "load_image", boom)
    result = run("segment", "horse", "--out", tmp_path / "o.png")
    assert result.exit_code == 1, result.output
    assert _error_line(result) == ("error: RuntimeError: CUDA error: an illegal memory access was encountered "
                                   "(unexpected; SAM_SPARSE_TRACEBACK=1 shows where)")
    monkeypatch.setenv("SAM_SPARSE_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        CliRunner().invoke(main, ["segment", "horse", "--out", str(tmp_path / "o.png")], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------------
# Inputs are never overwritten; bad arguments are found before the model loads
# ---------------------------------------------------------------------------------------------------


def test_no_command_writes_over_its_inputs(work, tmp_path):
    """--out (or --save-masks) naming an input: exit 2 before any work, the input's bytes unchanged, --force
    or not (segment's image, render's and convert's policy file, demo's checkpoint)."""
    from skimage import data

    image = tmp_path / "photo.png"
    Image.fromarray(data.coffee()[:64, :80]).save(image)
    policy = tmp_path / "pol.yaml"
    policy.write_text(load_policy("local2d-30").to_yaml())
    before = {p: p.read_bytes() for p in (image, policy, work / "mobile_sam.pt")}
    plot = tmp_path / "pol.png"  # a policy file with an output's name: still the user's
    plot.write_bytes(policy.read_bytes())
    before[plot] = plot.read_bytes()
    cases = [
        ("segment", image, "--point", "10,10", "--out", image),
        ("segment", image, "--point", "10,10", "--policy", plot, "--out", plot),
        ("segment", image, "--point", "10,10", "--policy", plot, "--out", tmp_path / "o.png", "--save-masks", plot),
        ("demo", "--policy", plot, "--out", plot),
        ("bench", "--policy", plot, "--plot", plot, "--device", "cpu", "--warmup", "0", "--iters", "1"),
        ("segment", image, "--point", "10,10", "--out", tmp_path / "o.png", "--save-masks", image),
        ("demo", "--checkpoint", work / "mobile_sam.pt", "--out", work / "mobile_sam.pt"),
        ("policies", "render", policy, "--out", policy),
        ("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", policy, "--out", policy, "--force"),
    ]
    for args in cases:
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        line = _error_line(result)
        assert "is the same file as" in line or "expected a file name ending in" in line, (args, line)
        assert "Using the built-in default model" not in result.stderr, args
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png", "pol.png", "pol.yaml"]


def test_render_checks_its_output_first_and_writes_whole(tmp_path, monkeypatch):
    result = run("policies", "render", "local2d-30", "--out", tmp_path / "masks.txt")
    assert result.exit_code == 2 and "expected a file name ending in .png" in _error_line(result)
    result = run("policies", "render", "local2d-30", "--out", tmp_path / "nodir" / "m.png")
    assert result.exit_code == 2 and "does not exist" in _error_line(result)
    out = tmp_path / "m.png"
    out.write_bytes(b"old")
    from matplotlib.figure import Figure

    def broken(self, fname, **kwargs):
        Path(fname).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken)
    result = run("policies", "render", "local2d-30", "--out", out)
    assert result.exit_code == 1 and "No space left" in _error_line(result)  # the environment: exit 1
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_verify_checks_its_arguments_before_the_model_loads():
    for args, says in [((), "--policy is required"),
                       (("--policy", "dense", "--min-mask-iou", "7"), "--min-mask-iou 7.0: expected a number from 0 to 1"),
                       (("--policy", "dense", "--min-cosine", "nan"), "--min-cosine nan: expected a number from 0 to 1"),
                       (("--policy", "dense", "--min-cosine", "-3"), "--min-cosine -3.0: expected a number from 0 to 1")]:
        result = run("verify", "--images", "horse", *args)
        assert result.exit_code == 2 and says in _error_line(result), (args, result.output)
        assert "Using the built-in default model" not in result.stderr


def test_verify_takes_points_and_several_boxes_each_a_prompt():
    result = run("verify", "--policy", "dense", "--images", "horse", "--points", "200,160", "--boxes", "13,4,393,317",
                 "--boxes", "100,50,300,250", "--single-mask", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stdout and "| 2     |" in result.stdout  # one decoder call for the points, one for the boxes


def test_convert_reads_no_checkpoint_for_a_bad_policy(work, tmp_path, monkeypatch):
    from sam_sparse import convert as convert_module

    def forbidden(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the policy was checked")

    monkeypatch.setattr(convert_module, "load_checkpoint", forbidden)
    result = run("convert", "--checkpoint", work / "mobile_sam.pt", "--policy", "densee", "--out", tmp_path / "x.pt")
    assert result.exit_code == 2 and "densee" in _error_line(result)


def test_clear_errors_for_a_folder_image_and_a_file_cache(tmp_path):
    (tmp_path / "imgs").mkdir()
    result = run("segment", tmp_path / "imgs", "--out", tmp_path / "o.png")
    assert result.exit_code == 2 and "is a folder; expected an image file" in _error_line(result)
    (tmp_path / "afile").write_text("x")
    result = run("fetch", "mobile_sam", "--dir", tmp_path / "afile")
    assert result.exit_code == 2 and "is a file; expected a folder" in _error_line(result)


def test_images_load_upright_by_their_exif_orientation(tmp_path):
    """A JPEG stored 200 wide x 100 high with Orientation 6 (rotate 90 degrees clockwise to view) is what a
    viewer, and OpenCV's imread (segment-anything's amg.py), show: 100 wide x 200 high, its stored top-left
    corner at the top right. Prompts are checked against those pixels."""
    from sam_sparse.segment import load_image

    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:20, :20] = 255  # a white square at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.shape == (200, 100, 3)
    assert upright[:20, -20:].mean() > 200 and upright[:20, :20].mean() < 50
    result = run("segment", path, "--point", "50,150", "--out", tmp_path / "o.png", "--device", "cpu")
    assert result.exit_code == 0, result.output  # (50, 150) lies inside the upright 100 x 200 image
