"""sam-sparse amg against a hostile user (issue 25): odd image names never address anything outside their
own output, every per-image failure is recorded and the run goes on, manifest.json is there while the
run goes, and --overlay pictures. Real MobileSAM on tiny images; a fuzz test of the output names."""

import json
import os
import time
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from amg_helpers import stub_generate
from sam_sparse import amg as job
from sam_sparse.cli import main
from sam_sparse.models import fetch_mobile_sam

SETTINGS = ["--points-per-side", "2", "--device", "cpu"]


def amg(*args):
    return CliRunner().invoke(main, ["amg", *[str(a) for a in args], *SETTINGS])


def photo(path: Path, size=(48, 40)) -> Path:
    from skimage import data

    Image.fromarray(data.coffee()).resize(size).save(path, format="PNG")
    return path


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture
def stubbed(monkeypatch):
    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate", stub_generate)


def stopping_at(n: int, error: BaseException):
    """A stubbed AutomaticMaskGenerator.generate that raises `error` on its n-th call (a Ctrl-C, a kill)."""
    calls = []

    def generate(self, image, embedding=None, prepared=None):
        calls.append(1)
        if len(calls) == n:
            raise error
        return stub_generate(self, image)

    return generate


def tree(root: Path) -> dict:
    """Every file under root with its bytes: what must not change."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- 1, 2: names made of dots --------------------------------------------------------------------


def test_an_image_named_dots_png_leaves_the_folder_above_out_alone(tmp_path, stubbed):
    """Item 1: `...png` (pathlib stem "..") was written as out/.., which was then removed."""
    (tmp_path / "in").mkdir()
    photo(tmp_path / "in" / "...png")
    (tmp_path / "precious.txt").write_text("keep")
    before = tree(tmp_path)
    result = amg(tmp_path / "in", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "precious.txt").read_text() == "keep"
    assert all(tree(tmp_path).get(p) == b for p, b in before.items())  # the input and the file beside it
    (record,) = manifest(tmp_path / "out")["images"]
    assert Path(record["output"]).parent == tmp_path / "out" and (Path(record["output"]) / "metadata.csv").is_file()


def test_an_image_named_dot_png_keeps_the_other_outputs(tmp_path, stubbed):
    """Item 2: `..png` (stem ".") was written as out/. itself, replacing every earlier output."""
    d = tmp_path / "in"
    d.mkdir()
    photo(d / "(a).png")  # sorts before "..png": done first
    photo(d / "..png", size=(40, 48))
    out = tmp_path / "out"
    result = amg(d, "--out", out)
    assert result.exit_code == 0, result.output
    records = manifest(out)["images"]
    assert len(records) == 2 and {r["status"] for r in records} == {"done"}
    for r in records:  # every output the manifest lists exists, and holds that image's masks
        rows = (Path(r["output"]) / "metadata.csv").read_text().splitlines()
        assert len(rows) - 1 == r["masks"]
    assert len({r["output"] for r in records}) == 2


# --- 3: names of the job's own files -------------------------------------------------------------


def test_an_image_named_manifest_is_not_written_over_the_manifest(tmp_path, stubbed):
    """Item 3: `manifest.png` in coco_rle mode was written as manifest.json, which the manifest overwrote."""
    d = tmp_path / "in"
    d.mkdir()
    photo(d / "manifest.png")
    photo(d / "manifest.rank1.png")
    out = tmp_path / "out"
    result = amg(d, "--out", out, "--output-mode", "coco_rle")
    assert result.exit_code == 0, result.output
    records = manifest(out)["images"]
    assert {r["status"] for r in records} == {"done"}
    for r in records:
        assert Path(r["output"]).name not in ("manifest.json", "manifest.rank1.json")
        masks = json.loads(Path(r["output"]).read_text())
        assert isinstance(masks, list) and len(masks) == r["masks"]
    again = amg(d, "--out", out, "--output-mode", "coco_rle")
    assert again.exit_code == 0 and "0 done, 2 skipped" in again.stdout
    assert [r["masks"] for r in manifest(out)["images"]] == [r["masks"] for r in records]


# --- 4: --out inside the input folder ---------------------------------------------------------------


def test_out_inside_the_input_folder_is_not_searched(tmp_path, stubbed):
    """Item 4: a rerun took the previous run's masks for images."""
    d = tmp_path / "in"
    d.mkdir()
    photo(d / "a.png")
    for _ in range(2):
        result = amg(d, "--out", d / "masks")
        assert result.exit_code == 0, result.output
        assert "amg: 1 image(s)" in result.stderr and "is inside" in result.stderr
    assert len(manifest(d / "masks")["images"]) == 1
    same = amg(d, "--out", d)
    assert same.exit_code == 2 and "is the input folder itself" in same.stderr
    assert "Using the built-in default model" not in same.stderr


def test_input_images_in_out_itself_and_a_foreign_manifest_are_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    photo(out / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{out / 'a.png'}\n")
    result = amg(listing, "--out", out)
    assert result.exit_code == 2 and "lies in --out" in result.stderr, result.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"mine": 1}')
    result = amg(out / "a.png", "--out", other)
    assert result.exit_code == 2 and "did not write" in result.stderr, result.output
    assert (other / "manifest.json").read_text() == '{"mine": 1}'


# --- 5: temporaries matched exactly -------------------------------------------------------------------


def test_glob_characters_and_temporary_lookalikes_touch_no_other_image(tmp_path, stubbed):
    """Item 5: `[x].png` removed x's temporaries (a glob with the name in it); `.x.tmp-1.png`'s output was
    x's temporary to remove."""
    d = tmp_path / "in"
    d.mkdir()
    photo(d / "[x].png")
    photo(d / ".x.tmp-1.png")
    photo(d / "x.png")
    out = tmp_path / "out"
    out.mkdir()
    foreign = out / ".x.tmp-4242"  # x's temporary from another rank's run, in progress
    foreign.mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("in/[x].png\nin/.x.tmp-1.png\n")
    result = amg(listing, "--out", out)
    assert result.exit_code == 0, result.output
    assert foreign.is_dir()
    outputs = [Path(r["output"]) for r in manifest(out)["images"]]
    result = amg(d / "x.png", "--out", out)  # x's own run removes x's temporaries, nobody else's outputs
    assert result.exit_code == 0, result.output
    assert not foreign.exists()
    assert all((o / "metadata.csv").is_file() for o in outputs)


def test_amg_never_replaces_what_it_did_not_write(tmp_path, stubbed):
    d = tmp_path / "photos"
    d.mkdir()
    photo(d / "a.png")
    photo(d / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").mkdir()
    (out / "a" / "notes.txt").write_text("mine")
    (out / "b.json").write_text("not amg's")
    for mode in ("binary_mask", "coco_rle"):
        result = amg(d, "--out", out, "--output-mode", mode, "--overwrite")
        assert result.exit_code == 3, result.output
        failed = [r for r in manifest(out)["images"] if r["status"] == "failed"]
        assert len(failed) == 1 and "is not an output of sam-sparse amg" in failed[0]["error"]
    assert (out / "a" / "notes.txt").read_text() == "mine" and (out / "b.json").read_text() == "not amg's"


# --- 6, 7, 15: per-image failures are recorded, the run goes on ---------------------------------------


def huge_png(path: Path, side=20000) -> Path:
    """A valid 1-bit PNG of side x side pixels (400 megapixels: PIL's DecompressionBombError), 60 kB."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    rows = zlib.compress(b"\0" * ((1 + side // 8) * side), 9)
    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_recorded_and_the_run_goes_on(tmp_path, stubbed):
    """Item 6: a 20000x20000 PNG ended the run with a traceback, exit 1 and no manifest."""
    d = tmp_path / "in"
    d.mkdir()
    huge_png(d / "huge.png")
    photo(d / "ok.png")
    (d / "corrupt.jpg").write_bytes(b"not a jpeg")
    result = amg(d, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    m = manifest(tmp_path / "out")
    assert m["summary"] == {"done": 1, "skipped": 0, "failed": 2, "pending": 0} and m["finished"]
    errors = {Path(r["image"]).name: r["error"] for r in m["images"]}
    assert "too large" in errors["huge.png"] and "cannot be read as an image" in errors["corrupt.jpg"]


def test_a_broken_symlink_is_recorded_as_failed(tmp_path, stubbed):
    """Item 7: a broken symbolic link in the input folder was skipped silently."""
    d = tmp_path / "in"
    d.mkdir()
    photo(d / "ok.png")
    (d / "gone.png").symlink_to(tmp_path / "nowhere.png")
    result = amg(d, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    failed = [r for r in manifest(tmp_path / "out")["images"] if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["image"].endswith("gone.png") and "broken symbolic link" in failed[0]["error"]


def test_a_missing_listed_file_is_recorded_and_the_run_goes_on(tmp_path, stubbed):
    """Item 15: a missing file in a .txt list stopped the whole run (exit 2), a corrupt one did not."""
    photo(tmp_path / "ok.png")
    listing = tmp_path / "list.txt"
    listing.write_text("ok.png\nmissing.png\n")
    result = amg(listing, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "1 image(s) not found" in result.stderr
    m = manifest(tmp_path / "out")
    assert m["summary"] == {"done": 1, "skipped": 0, "failed": 1, "pending": 0}
    failed = [r for r in m["images"] if r["status"] == "failed"]
    assert failed[0]["image"].endswith("missing.png") and "no such file" in failed[0]["error"]
    listing.write_text("ok.png\n./ok.png\n")
    twice = amg(listing, "--out", tmp_path / "out2")
    assert twice.exit_code == 2 and "the same file as line 1" in twice.stderr


def test_images_stream_and_a_failed_generation_fails_that_image_alone(tmp_path, monkeypatch):
    """Without --batch-images, amg streams the images through generate_many (the next one read and resized
    on a worker thread). An error inside one image's generation (out of device memory, say) ends that
    stream: the image is failed with the error, and a new stream takes the rest."""
    d = tmp_path / "in"
    d.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png", "d.png")):
        photo(d / name, size=(48 + i, 40))  # b.png: 49 wide
    (d / "c.png").write_bytes(b"not a png")
    streams, real_stream = [], job.AutomaticMaskGenerator.generate_many

    def counted(self, items, load=None, depth=2):
        streams.append([Path(i[0]).name for i in items])
        return real_stream(self, items, load, depth)

    def fail_on_b(self, image, embedding=None, prepared=None):
        assert prepared is not None, "the stream prepares ahead"
        if image.shape[1] == 49:
            raise RuntimeError("CUDA out of memory (simulated)")
        return stub_generate(self, image)

    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate_many", counted)
    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate", fail_on_b)
    result = amg(d, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    m = manifest(tmp_path / "out")
    assert [(Path(r["image"]).name, r["status"]) for r in m["images"]] == [
        ("a.png", "done"), ("b.png", "failed"), ("c.png", "failed"), ("d.png", "done")]
    errors = {Path(r["image"]).name: r["error"] for r in m["images"]}
    assert "CUDA out of memory (simulated)" in errors["b.png"] and "cannot be read" in errors["c.png"]
    assert streams == [["a.png", "b.png", "c.png", "d.png"], ["c.png", "d.png"]]


def test_outputs_are_written_beside_the_next_generation_and_a_failed_write_fails_alone(tmp_path, monkeypatch, stubbed):
    """Streamed, each image's outputs are written on a writer thread while the next image generates (the
    generator is seen running during a write), records are finished in input order, and an image whose
    outputs cannot be written fails alone with the error; the next images are still written."""
    import threading

    d = tmp_path / "in"
    d.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        photo(d / name, size=(48 + i, 40))  # b.png: 49 wide
    writing, overlapped, real_write = threading.Event(), [], job._write

    def slow_write(records, image, record, output_mode, overlay):
        assert threading.current_thread() is not threading.main_thread(), "outputs written on the main thread"
        if Path(record["image"]).name == "b.png":
            raise OSError("No space left on device (simulated)")
        writing.set()
        time.sleep(0.3)
        writing.clear()
        real_write(records, image, record, output_mode, overlay)

    def generate(self, image, embedding=None, prepared=None):
        overlapped.append(writing.is_set())
        return stub_generate(self, image)

    monkeypatch.setattr(job, "_write", slow_write)
    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate", generate)
    result = amg(d, "--out", tmp_path / "out")
    assert result.exit_code == 3, result.output
    m = manifest(tmp_path / "out")
    assert [(Path(r["image"]).name, r["status"]) for r in m["images"]] == [
        ("a.png", "done"), ("b.png", "failed"), ("c.png", "done")]
    assert "No space left on device (simulated)" in m["images"][1]["error"]
    assert (tmp_path / "out" / "c").is_dir() and not (tmp_path / "out" / "b").exists()
    assert any(overlapped), "no generation ran while an image's outputs were being written"


# --- 16: the manifest while the run goes ------------------------------------------------------------


def test_an_interrupted_run_leaves_a_manifest(tmp_path, stubbed, monkeypatch):
    """Item 16: a run stopped by Ctrl-C (and one killed outright) left no manifest.json."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        photo(d / name)
    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate", stopping_at(2, KeyboardInterrupt()))
    result = amg(d, "--out", tmp_path / "out")
    assert result.exit_code == 130 and "error: interrupted" in result.stderr, result.output
    m = manifest(tmp_path / "out")
    assert not m["finished"] and m["summary"] == {"done": 1, "skipped": 0, "failed": 0, "pending": 2}
    assert [r["status"] for r in m["images"]] == ["done", "pending", "pending"]

    # Killed outright (no handler runs): what was written after each image is what is there.
    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate", stopping_at(2, SystemExit(137)))
    monkeypatch.setattr(job, "MANIFEST_SECONDS", 0.0)
    result = amg(d, "--out", tmp_path / "killed")
    assert result.exit_code == 137
    m = manifest(tmp_path / "killed")
    assert not m["finished"] and [r["status"] for r in m["images"]] == ["done", "pending", "pending"]
    resumed = amg(d, "--out", tmp_path / "killed")
    assert resumed.exit_code == 0 and "2 done, 1 skipped" in resumed.stdout
    assert manifest(tmp_path / "killed")["finished"]


# --- 17: --overlay --------------------------------------------------------------------------------------


def check_overlays(out: Path):
    for r in manifest(out)["images"]:
        picture = Path(r["overlay"])
        assert picture.parent == out and picture.name.endswith(".overlay.png") and r["masks"] > 0
        with Image.open(picture) as im, Image.open(r["image"]) as src:
            drawn, image = np.asarray(im.convert("RGB")), np.asarray(src.convert("RGB"))
        assert drawn.shape == image.shape and (drawn != image).any()


def test_overlay_draws_the_generators_masks(tmp_path):
    """Item 17: amg could write no picture of its masks. One image through the real generator."""
    d = tmp_path / "in"
    d.mkdir()
    photo(d / "..png", size=(64, 48))
    result = amg(d, "--out", tmp_path / "out", "--overlay")
    assert result.exit_code == 0, result.output
    check_overlays(tmp_path / "out")


def test_overlay_of_coco_rle_masks_and_a_missing_picture(tmp_path, stubbed):
    d = tmp_path / "in"
    d.mkdir()
    photo(d / "a.png", size=(64, 48))
    photo(d / "b.png")
    out = tmp_path / "out"
    result = amg(d, "--out", out, "--overlay", "--output-mode", "coco_rle")
    assert result.exit_code == 0, result.output
    check_overlays(out)
    Path(manifest(out)["images"][0]["overlay"]).unlink()
    again = amg(d, "--out", out, "--overlay", "--output-mode", "coco_rle")  # that image is redone
    assert again.exit_code == 0 and "1 done, 1 skipped" in again.stdout
    check_overlays(out)


# --- the output names: a fuzz test over odd names -----------------------------------------------------

ODD = ["...png", "..png", ".png", "manifest.png", "manifest.json.png", "MANIFEST.PNG", "manifest.rank1.png",
       "manifest.rank1.json.png", "a.png", "A.png", "a.PNG", "[x].png", "x.png", "*.png", "?.png", ".x.tmp-1.png",
       "x.overlay.png", "x.overlay.png.png", "x.json.png", "-rf.png", "--out.png", " .png", "con.png", "é.png",
       "e\u0301.png", "写真.png", "x~00000000.png", "x_.png", "x .png", "ﬁ.png", "fi.png", "\udcff.png"]
COMPONENT = st.one_of(
    st.sampled_from(ODD),
    st.builds(lambda text, png: text + (".png" if png else ""),
              st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=12),
              st.booleans()),
)


def job_files(world=8):
    return {"manifest.json", *(job.manifest_part(r) for r in range(world))}


def owned(name):
    """Every file an image's name may give: its outputs in both modes, its picture, its temporaries."""
    return [name, f"{name}.json", f"{name}.overlay.png", f".{name}.tmp-123", f".{name}.tmp-abc_9.json",
            f".{name}.overlay.tmp-x1.png", f".{name}.old.tmp-123"]


def check_names(paths, root, out):
    names = job.output_names(paths, root)
    assert set(names) == set(paths)
    keys = [job.name_key(n) for n in names.values()]
    assert len(set(keys)) == len(keys), "two names the same up to case / normalization"
    jobs = {job.name_key(f) for f in job_files()}
    outputs = set()
    for n in names.values():
        job.check_name(n)
        for mode in job.OUTPUT_MODES:
            target = job.output_path(out, n, mode)
            assert target.parent == out and os.path.realpath(target).startswith(os.path.realpath(out) + os.sep)
            assert job.name_key(target.name) not in jobs
        for f in owned(n):
            assert "/" not in f and job.name_key(f) not in jobs and f not in (".", "..")
            key = job.name_key(f)
            assert key not in outputs, f"{f!r} of {n!r} is another image's file"
            outputs.add(key)
    return names


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(folders=st.lists(st.lists(COMPONENT, min_size=1, max_size=3), min_size=1, max_size=8))
def test_output_names_fuzz(tmp_path, folders):
    """Random odd names, in a folder (joined by "__") and in a .txt list (slashes, "..": file name only):
    every output path inside --out, unique up to case, never a job file or another image's file; and
    remove_partial removes exactly its image's temporaries."""
    root, out = Path("/data/in"), tmp_path / "out"
    out.mkdir(exist_ok=True)
    first = folders[0]  # its twins up to case and to normalization, in every example
    folders = folders + [first[:-1] + [first[-1].swapcase()], first[:-1] + [unicodedata.normalize("NFD", first[-1])]]
    in_folder = sorted({root.joinpath(*parts) for parts in folders})
    check_names(in_folder, root, out)
    listed = sorted({Path("/lists", *parts) for parts in folders})
    names = check_names(listed, None, out)
    assert job.output_names(listed, None) == names  # stable from run to run
    # Every owned file of every name on disk; one image's remove_partial takes its temporaries only.
    for entry in os.listdir(out):
        os.unlink(out / entry) if (out / entry).is_file() else os.rmdir(out / entry)
    for n in names.values():
        for f in owned(n):
            (out / f).mkdir() if f.endswith("-123") else (out / f).write_text("")
    victim = next(iter(names.values()))
    job.remove_partial(out, victim)
    left = set(os.listdir(out))
    for n in names.values():
        for f in owned(n):
            assert (f in left) == (n != victim or not f.startswith(".")), (victim, f)


def test_output_names_of_the_issue():
    root = Path("/in")
    names = job.output_names([root / n for n in ("...png", "..png", "manifest.png", "a.png", "A.png", "b.png",
                                                 "sub/chelsea.png", "[x].png")], root)
    assert names[root / "b.png"] == "b" and names[root / "sub/chelsea.png"] == "sub__chelsea"  # plain names stay
    for odd in ("...png", "..png", "manifest.png", "a.png", "A.png", "[x].png"):
        assert job.HASH_MARK in names[root / odd] and not names[root / odd].startswith(".")
    with pytest.raises(ValueError, match="not one output_names gives"):
        job.output_path(Path("/out"), "..", "binary_mask")


# --- files amg did not write, where it writes ------------------------------------------------------------


def test_files_amg_did_not_write_are_never_replaced_or_deleted(tmp_path, stubbed):
    """A note inside an earlier output folder (--overwrite would replace the folder), a picture of the user's
    named NAME.overlay.png, a manifest.rank1.json of the user's: each is left byte for byte; the images they
    are in the way of fail alone, saying why; amg's own overlays are recognised and redone."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a", "b", "c"):
        photo(d / f"{name}.png")
    out = tmp_path / "out"
    assert amg(d, "--out", out, "--overlay").exit_code == 0
    assert job.existing_output(out / "c", "binary_mask") == 2
    (out / "a" / "notes.txt").write_text("mine")
    (out / "b.overlay.png").write_bytes((d / "b.png").read_bytes())  # a PNG amg did not write
    (out / "manifest.rank1.json").write_text('{"my": "notes"}')
    mine = {p: p.read_bytes() for p in (out / "a" / "notes.txt", out / "b.overlay.png", out / "manifest.rank1.json")}
    result = amg(d, "--out", out, "--overlay", "--overwrite")
    assert result.exit_code == 3, result.output  # some images failed
    assert {p: p.read_bytes() for p in mine} == mine
    records = {Path(r["image"]).stem: r for r in manifest(out)["images"]}
    assert records["a"]["status"] == "failed" and "did not write (notes.txt)" in records["a"]["error"]
    assert records["b"]["status"] == "failed" and "not an overlay sam-sparse amg wrote" in records["b"]["error"]
    assert records["c"]["status"] == "done"


def test_a_list_that_is_not_text_is_refused_clearly(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    result = amg(lst, "--out", tmp_path / "out")
    assert result.exit_code == 2 and f"input {lst}: not UTF-8 text" in result.stderr, result.output


# --- a rerun made otherwise; bad input leaves no folder -------------------------------------------------


def test_a_rerun_made_otherwise_is_refused_and_overwrite_redoes_it(tmp_path, stubbed):
    """A rerun into an --out whose complete outputs came from another policy, mode, generator setting or policy
    file contents would skip them and record them as its own: refused (exit 2, nothing written) unless
    --overwrite; the same settings skip as before; the manifest names what made the masks."""
    img = photo(tmp_path / "a.png")
    out = tmp_path / "out"
    assert amg(img, "--out", out).exit_code == 0
    first = manifest(out)
    size = fetch_mobile_sam().stat().st_size
    assert first["model"] == "mobile_sam" and first["policy"] == "dense"
    assert first["weights"] == f"mobile_sam.pt ({size} bytes)" and len(first["policy_sha256"]) == 64
    assert len({r["made"] for r in first["images"]}) == 1
    before = tree(out)
    policy = tmp_path / "pol.yaml"
    policy.write_text("name: dense\nrules:\n  - match: '*'\n    pattern: dense\n")
    for args, said in ((("--policy", "random-0.5"), "policy 'dense' -> 'random-0.5'"),
                       (("--mode", "exact"), "mode 'fast' -> 'exact'"),
                       (("--stability-score-thresh", "0.9"), "stability_score_thresh 0.95 -> 0.9"),
                       (("--policy", policy), "policy 'dense': its rules changed")):
        result = amg(img, "--out", out, *args)
        assert result.exit_code == 2, (args, result.output)
        assert said in result.stderr and "--overwrite" in result.stderr, (args, result.stderr)
        assert tree(out) == before, args
    result = amg(img, "--out", out)
    assert result.exit_code == 0 and manifest(out)["summary"]["skipped"] == 1, result.output
    result = amg(img, "--out", out, "--mode", "exact", "--overwrite")
    assert result.exit_code == 0 and manifest(out)["summary"]["done"] == 1 and manifest(out)["mode"] == "exact"
    assert amg(img, "--out", out, "--mode", "exact").exit_code == 0  # now the folder's own settings
    same = amg(img, "--out", out, "--mode", "exact", "--checkpoint", fetch_mobile_sam())  # the built-in's file
    assert same.exit_code == 0 and manifest(out)["summary"]["skipped"] == 1, same.output


def test_an_interrupted_overwrite_leaves_the_old_masks_marked_as_the_old_runs(tmp_path, stubbed, monkeypatch):
    """An --overwrite run with other settings stopped before it redid every image: the images it did not reach
    keep the earlier run's masks, and their records say so ("made"), so a rerun with the new settings is
    refused instead of skipping them as its own; --overwrite finishes the job."""
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        photo(d / name)
    out = tmp_path / "out"
    assert amg(d, "--out", out).exit_code == 0
    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate", stopping_at(2, KeyboardInterrupt()))
    assert amg(d, "--out", out, "--policy", "random-0.5", "--overwrite").exit_code == 130
    monkeypatch.setattr(job.AutomaticMaskGenerator, "generate", stub_generate)
    m = manifest(out)
    assert [r["status"] for r in m["images"]] == ["done", "pending", "pending"] and m["policy"] == "random-0.5"
    assert m["images"][1]["made"] == m["images"][2]["made"] != m["images"][0]["made"]
    result = amg(d, "--out", out, "--policy", "random-0.5")
    assert result.exit_code == 2 and "holds the masks of 2 image(s) made otherwise" in result.stderr, result.stderr
    assert "an --overwrite that did not finish" in result.stderr
    assert amg(d, "--out", out, "--policy", "random-0.5", "--overwrite").exit_code == 0
    assert manifest(out)["summary"]["done"] == 3


def test_a_manifest_of_an_older_sam_sparse_is_judged_by_its_run(tmp_path, stubbed):
    """A manifest written before records said which run made them: its run's fields decide (one it lacks is not
    compared, and its "model": "from manifest" of a --sparse-checkpoint run matches any model)."""
    img = photo(tmp_path / "a.png")
    out = tmp_path / "out"
    assert amg(img, "--out", out).exit_code == 0
    old = manifest(out)
    for r in old["images"]:
        del r["made"]
    for key in ("weights", "policy_sha256"):
        del old[key]
    old["model"] = "from manifest"
    (out / "manifest.json").write_text(json.dumps(old))
    assert amg(img, "--out", out).exit_code == 0 and manifest(out)["summary"]["skipped"] == 1
    old["policy"] = "random-0.5"
    (out / "manifest.json").write_text(json.dumps(old))
    result = amg(img, "--out", out)
    assert result.exit_code == 2 and "policy 'random-0.5' -> 'dense'" in result.stderr, result.stderr


def test_bad_input_found_at_the_model_leaves_no_out_folder(tmp_path):
    """A checkpoint or policy that fails when the model loads or is patched: exit 2 and no --out folder made."""
    img = photo(tmp_path / "a.png")
    heads = tmp_path / "heads.yaml"
    heads.write_text("name: h\nrules:\n  - match: '*'\n    heads: [99]\n    pattern: local2d\n    params: {radius: 1}\n")
    for i, args in enumerate((("--model-type", "vit_b"), ("--checkpoint", tmp_path / "missing.pt"),
                              ("--policy", heads))):
        out = tmp_path / f"out{i}"
        result = amg(img, "--out", out, *args)
        assert result.exit_code == 2, (args, result.output)
        assert not out.exists(), args
