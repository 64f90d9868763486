"""Calibration of SAM 2's video memory attention: the measured block mass against float64 attention of the
q / k SAM 2 itself attends with, planted locality found, frames-folder checks."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("sam2", reason="SAM 2 tests need the sam2 extra (README: install)")

from sam2.build_sam import build_sam2_video_predictor
from sam2.modeling.sam import transformer as sam2_transformer
import sam2_helpers
from sam2_helpers import photo, sharpen_attention_

from sam_sparse import patch_sam
from sam_sparse.calibration import (
    MemoryRecorder,
    MemoryStats,
    choose_memory_radius,
    measure_memory,
    memory_kept,
    memory_mask,
    memory_policy,
    video_frames,
)
from sam_sparse.cli import main
from sam_sparse.geometry import MemoryLayout
from sam_sparse.models import build_model
from sam_sparse.policy import Policy, load_policy
from sam_sparse.sam2_layers import SAM2_CONFIGS, memory_layer, nominal_memory


def seeded():
    seed = torch.seed() % 2**31
    return seed, np.random.default_rng(seed)


def write_frames(folder, n, seed=0, h=96, w=128):
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n):
        img = np.roll(photo(h, w, seed=seed + t), 4 * t, axis=1)  # the discs move right
        Image.fromarray(img).save(folder / f"{t:05d}.jpg", quality=95)
    return folder


def small_video_predictor(seed=0, image_size=256):
    torch.manual_seed(seed)
    pred = build_sam2_video_predictor(SAM2_CONFIGS["sam2.1_hiera_t"], None, device="cpu",
                                      hydra_overrides_extra=[f"++model.image_size={image_size}"])
    return sharpen_attention_(pred.eval(), seed=seed)


# --- statistics ----------------------------------------------------------------------------------


def test_memory_mass_is_sam2s_own_attention_in_float64(tmp_path):
    """Per call of memory layer 1's cross-attention, the recorded block mass equals softmax(q k^T / sqrt(d))
    in float64 of the q and k SAM 2's RoPEAttention passes to scaled_dot_product_attention (captured
    there), summed into (query block, key block)."""
    seed, _ = seeded()
    pred = small_video_predictor(seed % 1000)
    frames = write_frames(tmp_path / "clip", 3, seed=seed % 1000)
    attn = pred.memory_attention.layers[1].cross_attn_image
    captured, inside = [], []
    sdpa = sam2_transformer.F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        if inside:
            captured.append((q.detach().double().clone(), k.detach().double().clone()))
        return sdpa(q, k, v, *a, **kw)

    hooks = [attn.register_forward_pre_hook(lambda *a: inside.append(1)),
             attn.register_forward_hook(lambda *a: inside.clear())]
    sam2_transformer.F.scaled_dot_product_attention = spy
    try:
        stats = measure_memory(pred, str(frames), block_size=16)
    finally:
        sam2_transformer.F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    assert len(captured) == 2  # frames 1 and 2
    layer1 = sorted((s for s in stats if s.index == 1), key=lambda s: len(s.frames))
    assert [s.frames for s in layer1] == [(True,), (True, False)]  # frame 0 prompted: the conditioning frame
    assert [s.pointer_tokens for s in layer1] == [4, 8]  # one 4-token object pointer per earlier frame
    assert {s.name for s in stats} == {f"memory_attention.layers.{i}.cross_attn_image" for i in range(4)}
    for st, (q, k) in zip(layer1, captured):
        p = F.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)[0, 0]  # (Nq, Nk), one head
        nk = k.shape[2]
        pad = -nk % 16
        expected = F.pad(p, (0, pad)).reshape(16, 16, -1, 16).sum(dim=(1, 3))  # 256 queries, 16 per block
        assert st.mass.shape == (1,) + expected.shape and st.grid == (16, 16) and st.calls == 1
        err = float((st.mass[0] - expected).abs().max())
        assert err < 1e-3, f"seed {seed}: max abs err {err}"


def planted_call(grid=32, frames=7, pointers=8, shift_rows=2, gain=24.0):
    """q, k of a memory cross-attention call where each query (r, c) attends the token (r + shift_rows, c) of
    the LAST memory frame (the previous frame; the bottom rows, their own place there): codes are one-hot in a row
    part and a column part, so a key matching row and column scores 2 * gain**2 / 16 and one matching either,
    gain**2 / 16 less. Other frames and pointers get unrelated random keys. Shapes (1, N, 1, 256)."""
    g = torch.Generator().manual_seed(0)
    n = grid * grid
    r, c = torch.arange(n) // grid, torch.arange(n) % grid
    code = torch.zeros(n, 256, dtype=torch.float64)
    code[torch.arange(n), r] = gain
    code[torch.arange(n), 128 + c] = gain
    src = torch.clamp(r - shift_rows, min=0) * grid + c  # key (r, c) carries the code of query (r - shift, c)
    key_last = code[src]
    key_last[r < shift_rows] = 0.0  # rows no query reaches
    # The bottom rows have no rows below them: they attend their own place, through codes of their own.
    edge = r >= grid - shift_rows
    code[edge, r[edge]] = 0.0
    code[edge, 64 + r[edge] - (grid - shift_rows)] = gain
    key_last[edge, 64 + r[edge] - (grid - shift_rows)] = gain
    q = code
    other = torch.randn((frames - 1) * n + pointers, 256, generator=g, dtype=torch.float64)
    k = torch.cat([other[: (frames - 1) * n], key_last, other[(frames - 1) * n:]])
    return q[None, :, None], k[None, :, None]


def test_planted_locality_is_found():
    """Queries that attend two rows down (one key block over at block size 64 = 2 rows) in the previous
    frame: the recorder puts nearly all of each query block's mass on that block of the last frame."""
    q, k = planted_call()
    rec = MemoryRecorder(block_size=64)  # not attached to a model: one synthetic call
    rec.add("memory_attention.layers.0.cross_attn_image", 0, q, k, pointers=8)
    (st,) = rec.stats.values()
    assert st.frames == (True,) + (False,) * 6 and st.pointer_tokens == 8 and st.grid == (32, 32)
    qb = st.mass.shape[1]
    assert qb == 16 and st.mass.shape[2] == 7 * 16 + 1
    last = 6 * 16  # first key block of the last frame
    for i in range(qb):
        target = last + min(i + 1, qb - 1)  # the bottom block (rows 30-31) attends itself
        assert float(st.mass[0, i, target]) > 0.99 * 64, (i, st.mass[0, i].topk(3))
    assert float(st.mass.sum()) == pytest.approx(16 * 64)


@functools.cache
def _block_dist(grid, bs):
    """(QB, QB): the least Chebyshev distance between a token of block i and one of block j, raster order."""
    rows, cols = grid
    n = rows * cols
    tok = torch.arange(n)
    r, c = tok // cols, tok % cols
    dist = torch.maximum((r[:, None] - r[None]).abs(), (c[:, None] - c[None]).abs())
    return dist.reshape(n // bs, bs, n // bs, bs).amin(dim=(1, 3))


def band_mask(radius, cond_radius, frames, grid, pointers, bs):
    """The shared plan's memory-local, written here from its text as the test's oracle: a query block keeps
    the key blocks of a tracked frame within `radius` grid cells (Chebyshev, nearest tokens) of its own
    place, of a conditioning frame within cond_radius (None: all), and every pointer token. Needs
    rows * cols % bs == 0."""
    n = grid[0] * grid[1]
    block_dist = _block_dist(grid, bs)
    parts = []
    for cond in frames:
        rad = cond_radius if cond else radius
        parts.append(torch.ones_like(block_dist, dtype=torch.bool) if rad is None else block_dist <= rad)
    parts.append(torch.ones(n // bs, -(-pointers // bs), dtype=torch.bool))
    return torch.cat(parts, dim=1)


NOMINAL = MemoryLayout((True,) + (False,) * 6, (32, 32), 64)


def oracle_kept(stats, radius, cond_radius, bs=64):
    """Share of the measured mass band_mask (the test's own copy of the pattern) keeps."""
    kept = sum(float((st.mass * band_mask(radius, cond_radius, st.frames, st.grid, st.pointer_tokens, bs)).sum())
               for st in stats)
    return kept / sum(float(st.mass.sum()) for st in stats)


@pytest.mark.parametrize("target", [dict(min_mass=0.99), dict(target_density=0.3)])
def test_planted_locality_gives_a_policy_that_keeps_it(tmp_path, target):
    """The issue's bar: the planted locality is found and the policy written keeps >= 0.99 of its mass at
    density <= 0.3 (on the nominal memory: 7 frames, 64 pointer tokens), checked on the policy file as
    load_policy reads it: its own block masks against the measured mass, and the test's oracle pattern."""
    q, k = planted_call()
    rec = MemoryRecorder(block_size=64)
    rec.add("memory_attention.layers.0.cross_attn_image", 0, q, k, pointers=8)
    stats = list(rec.stats.values())
    choice = choose_memory_radius(stats, NOMINAL, 64, **target)
    assert choice.retained >= 0.99 and choice.density <= 0.3, choice
    if "min_mass" in target:  # the least that holds it: one block row over, nothing of the prompted frame
        assert (choice.radius, choice.cond_radius) == (1, 0), choice
        assert memory_kept(stats, memory_policy({0: (0, 0)}, 64)) < 0.1
    path = tmp_path / "planted.yaml"
    path.write_text(memory_policy({0: (choice.radius, choice.cond_radius)}, 64).to_yaml())
    policy = load_policy(path)
    (st,) = stats
    layer = memory_layer(st.name, "memory.cross", 1, 0, st.grid, 64, MemoryLayout(st.frames, st.grid, 8))
    keep = policy.block_mask(layer, None, "cpu")[0, 0]
    kept = float((st.mass * keep).sum() / st.mass.sum())  # from the measured tensor, not through calibration
    assert kept >= 0.99 and kept == pytest.approx(choice.retained, abs=1e-12)
    assert kept == pytest.approx(oracle_kept(stats, choice.radius, choice.cond_radius), abs=1e-12)
    nominal = memory_layer(st.name, "memory.cross", 1, 0, (32, 32), 64, NOMINAL)
    nominal_mask = policy.block_mask(nominal, None, "cpu")
    assert torch.equal(nominal_mask[0, 0], band_mask(choice.radius, choice.cond_radius, NOMINAL.frames, (32, 32), 64, 64))
    density = float(nominal_mask.double().mean())  # whole blocks here: 32 x 32 frames, 64 pointer tokens
    assert density <= 0.3 and density == pytest.approx(choice.density, abs=1e-12)


@pytest.mark.parametrize("target", [dict(min_mass=0.9), dict(min_mass=0.995), dict(target_density=0.4),
                                    dict(target_density=0.3), dict(target_density=0.15)])
def test_radius_choice_is_the_best_pair_of_a_full_search(target):
    """choose_memory_radius sweeps the radii once; a full search over every (radius, cond_radius) pair with
    the test's oracle pattern finds no pair better for the target (random mass, decaying with distance)."""
    seed, rng = seeded()
    grid, bs, pointers = (8, 8), 16, 16
    stats = []
    for frames in ((True,), (True, False), (True, False, False)):
        layout = MemoryLayout(frames, grid, pointers)
        dist = _block_dist(grid, bs).double()
        per_frame = [torch.exp(-dist / rng.uniform(0.5, 3)) * torch.from_numpy(rng.uniform(0.2, 1, dist.shape))
                     for _ in frames]
        mass = torch.cat(per_frame + [torch.from_numpy(rng.uniform(0, 0.5, (4, 1)))], dim=1)
        stats.append(MemoryStats("memory_attention.layers.2.cross_attn_image", 2, layout.frames, grid, pointers,
                                 mass[None], calls=1))
    nominal = MemoryLayout((True,) + (False,) * 6, grid, pointers)
    choice = choose_memory_radius(stats, nominal, bs, **target)
    pairs = [(r, rc) for r in range(8) for rc in [None] + list(range(8))]
    found = {(r, rc): (oracle_kept(stats, r, rc, bs), float(band_mask(r, rc, nominal.frames, grid, pointers, bs)
                                                           .double().mean())) for r, rc in pairs}
    assert found[choice.radius, choice.cond_radius] == pytest.approx((choice.retained, choice.density), abs=1e-12)
    if "min_mass" in target:
        ok = [d for kept, d in found.values() if kept >= target["min_mass"] - 1e-12]
        assert choice.retained >= target["min_mass"] - 1e-12 and choice.density == pytest.approx(min(ok)), seed
    else:
        ok = [kept for kept, d in found.values() if d <= target["target_density"] + 1e-9]
        if not ok:  # no pair that sparse (0.15 here): the sparsest, as documented
            assert (choice.radius, choice.cond_radius) == (0, 0)
            return
        assert choice.density <= target["target_density"] + 1e-9 and choice.retained == pytest.approx(max(ok)), seed


def test_memory_policy_is_memory_local_and_dense_elsewhere():
    policy = memory_policy({0: (2, None), 1: (2, None), 3: (5, 1)}, 128)
    rules = policy.to_dict()["rules"]
    assert rules == [
        {"match": "memory.cross", "layers": [0, 1], "pattern": "memory_local", "params": {"radius": 2, "cond_radius": None}},
        {"match": "memory.cross", "layers": [3], "pattern": "memory_local", "params": {"radius": 5, "cond_radius": 1}},
        {"match": "*", "pattern": "dense"},
    ]
    assert Policy.from_yaml(policy.to_yaml()) == policy
    g = memory_layer("m", "memory.cross", 1, 2, (64, 64), 128, nominal_memory())  # layer 2: no rule, dense
    assert policy.block_mask(g, None, "cpu") is None
    assert memory_mask(policy, 2, nominal_memory()).all()


# --- the frames folder ---------------------------------------------------------------------------------


def test_video_frames_order_and_errors(tmp_path):
    d = tmp_path / "clip"
    d.mkdir()
    Image.new("RGB", (8, 6)).save(d / "00010.jpg")
    Image.new("RGB", (8, 6)).save(d / "00002.jpeg", format="JPEG")
    (d / "notes.txt").write_bytes(b"x")
    assert [p.rsplit("/", 1)[1] for p in video_frames(str(d))] == ["00002.jpeg", "00010.jpg"]
    with pytest.raises(ValueError, match="not a folder"):
        video_frames(str(d / "00010.jpg"))
    (d / "cover.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="cover.jpg is not named by its frame index"):
        video_frames(str(d))
    one = tmp_path / "one"
    one.mkdir()
    (one / "0.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="1 JPEG frame"):
        video_frames(str(one))


# --- sam-sparse calibrate --frames -----------------------------------------------------------------


@pytest.fixture
def clip(tmp_path):
    return sam2_helpers.write_frames(tmp_path / "clip", count=4)  # 120 x 90 px, discs drifting right


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random hiera_t checkpoint in SAM 2's released layout ({"model": state dict})."""
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": sam2_helpers.small_video_predictor(image_size=128, seed=5).state_dict()}, path)
    return path


def calibrate_cli(*args):
    return CliRunner().invoke(main, ["calibrate", *[str(a) for a in args]])


def test_cli_writes_a_memory_policy_that_loads_and_patches(tmp_path, clip, tiny_checkpoint, monkeypatch):
    """The command on the tiny video predictor (built at 128 px: an 8 x 8 memory grid, blocks of 16 tokens =
    2 rows) writes a memory_local policy that load_policy and `policies check` accept, whose header's kept
    mass per layer is what the test's own oracle pattern keeps of a fresh measurement, and with which
    patch_sam(video predictor) propagates the clip through sparse memory cross-attention."""
    import sam_sparse.models

    monkeypatch.setattr(sam_sparse.models, "build_video_predictor",
                        functools.partial(sam_sparse.models.build_video_predictor, image_size=128))
    out = tmp_path / "mem.yaml"
    res = calibrate_cli("--model-type", "sam2.1_hiera_t", "--checkpoint", tiny_checkpoint, "--frames", clip,
                        "--point", "40,45", "--density", "0.5", "--block-size", "16", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output + res.stderr
    assert "RANDOM" not in res.stderr and "kept mass" in res.output
    text = out.read_text()
    policy = load_policy(out)
    assert policy.name == "mem" and policy.block_size == 16
    rules = policy.to_dict()["rules"]
    assert rules[-1] == {"match": "*", "pattern": "dense"}
    assert all(r["match"] == "memory.cross" and r["pattern"] == "memory_local" for r in rules[:-1])
    assert sorted(i for r in rules[:-1] for i in r["layers"]) == [0, 1, 2, 3]
    assert f"measured on {clip} (4 frames), prompt: point (40, 45) on frame 0" in text
    assert "7 memory frames (1 prompted) of 8x8 tokens + 64 pointer tokens" in text
    check = CliRunner().invoke(main, ["policies", "check", str(out)])
    assert check.exit_code == 0, check.output + check.stderr

    # The header's kept mass and density, against the oracle pattern on a fresh measurement.
    pred = sam_sparse.models.build_video_predictor("sam2.1_hiera_t", tiny_checkpoint)
    stats = measure_memory(pred, str(clip), prompt=("point", (40.0, 45.0)), block_size=16)
    for rule in rules[:-1]:
        r, rc = rule["params"]["radius"], rule["params"]["cond_radius"]
        for i in rule["layers"]:
            mine = [s for s in stats if s.index == i]
            density = float(band_mask(r, rc, *NOMINAL_8, 16).double().mean())  # whole blocks on an 8 x 8 grid
            assert density <= 0.5
            line = (f"memory_attention.layers.{i}.cross_attn_image: radius {r}, cond_radius "
                    f"{'whole frame' if rc is None else rc}: kept mass {oracle_kept(mine, r, rc, 16):.4f}, "
                    f"density {density:.3f}")
            assert line in text, (line, text)

    handle = patch_sam(pred, policy)
    try:
        with torch.inference_mode():
            state = pred.init_state(str(clip))
            pred.add_new_points_or_box(state, frame_idx=0, obj_id=0, points=np.array([[40.0, 45.0]], np.float32),
                                       labels=np.array([1], np.int32))
            frames = [f for f, _, _ in pred.propagate_in_video(state)]
    finally:
        handle.restore()
    assert frames == [0, 1, 2, 3]
    cross = [r for r in handle.report if r.kind == "memory.cross"]
    assert len(cross) == 4 and all(r.density is not None and r.density < 1 for r in cross), cross


NOMINAL_8 = ((True,) + (False,) * 6, (8, 8), 64)


def test_cli_without_checkpoint_says_the_weights_are_random(tmp_path, clip, monkeypatch):
    import sam_sparse.models

    monkeypatch.setattr(sam_sparse.models, "build_video_predictor",
                        functools.partial(sam_sparse.models.build_video_predictor, image_size=128))
    out = tmp_path / "random.yaml"
    res = calibrate_cli("--model-type", "sam2.1_hiera_t", "--frames", clip, "--mass", "0.9", "--block-size", "16",
                        "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output + res.stderr
    assert "RANDOM weights" in res.stderr and "cannot download SAM 2 checkpoints" in res.stderr
    assert "weights: random" in out.read_text() and "WEIGHTS WERE RANDOM" in out.read_text()
    load_policy(out)


def test_cli_bad_input_is_one_line_exit_2_before_the_model_loads(tmp_path, clip, monkeypatch):
    import sam_sparse.models

    def no_model(*a, **k):
        raise AssertionError("the model was built before the input was checked")

    monkeypatch.setattr(sam_sparse.models, "build_video_predictor", no_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    unnamed = tmp_path / "unnamed"
    sam2_helpers.write_frames(unnamed, count=2)
    (unnamed / "poster.jpg").write_bytes((unnamed / "00000.jpg").read_bytes())
    junk = tmp_path / "junk"
    sam2_helpers.write_frames(junk, count=3)
    (junk / "00001.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out" / "p.yaml"
    out.parent.mkdir()
    ok = ["--model-type", "sam2.1_hiera_t", "--mass", "0.99", "--out", out]
    cases = [
        (["--frames", clip / "00000.jpg", *ok], "not a folder"),
        (["--frames", tmp_path / "nowhere", *ok], "not a folder"),
        (["--frames", empty, *ok], "0 JPEG frame(s)"),
        (["--frames", unnamed, *ok], "poster.jpg is not named by its frame index"),
        (["--frames", junk, *ok], "frame " + str(junk / "00001.jpg") + " cannot be read as an image"),
        (["--frames", clip, "--model-type", "vit_b", "--mass", "0.99", "--out", out], "needs a SAM 2.1 model"),
        (["--frames", clip, "--mass", "0.99", "--out", out], "got no --model-type or --checkpoint"),
        (["--frames", clip, *ok, "--density", "0.3"], "exactly one of --target-density"),
        (["--frames", clip, "--model-type", "sam2.1_hiera_t", "--out", out], "exactly one of --target-density"),
        (["--frames", clip, *ok, "--point", "121,10"], "point 121,10 is outside frame 0 (120x90 px"),
        (["--frames", clip, *ok, "--point", "10,-1"], "is outside frame 0"),
        (["--frames", clip, *ok, "--box", "10,10,50,95"], "box 10,10,50,95 is outside frame 0"),
        (["--frames", clip, *ok, "--box", "50,10,10,20"], "expected X0<X1 and Y0<Y1"),
        (["--frames", clip, *ok, "--point", "1,2", "--box", "10,10,50,50"], "not both"),
        (["--frames", clip, *ok, "--point", "1"], "expected 2 comma-separated numbers"),
        (["--frames", clip, "--images", "astronaut", *ok], "not both"),
        (["--frames", clip, *ok, "--heldout", "astronaut"], "--heldout: image calibration options"),
        (["--frames", clip, *ok, "--points-per-side", "2"], "--points-per-side: image calibration options"),
        (["--images", "astronaut", "--point", "1,2", "--mass", "0.9", "--out", out], "use them with --frames"),
        (["--frames", clip, *ok, "--block-size", "100"], "block_size=100"),
        (["--frames", clip, *ok[:-1], tmp_path / "out" / "p.txt"], "expected a file name ending in .yaml"),
    ]
    for args, message in cases:
        res = calibrate_cli(*args)
        err = res.stderr.strip()
        assert res.exit_code == 2, (args, res.output, res.stderr)
        assert err.startswith("error:") and "\n" not in err and message in err, (args, err)
        assert "Traceback" not in res.output + res.stderr
        assert list(out.parent.iterdir()) == [], (args, list(out.parent.iterdir()))
    out.write_text("mine")
    res = calibrate_cli("--frames", clip, *ok)
    assert res.exit_code == 2 and "already exists; pass --force to replace it" in res.stderr, res.stderr
    assert out.read_text() == "mine" and list(out.parent.iterdir()) == [out]


def test_cli_reads_the_model_type_from_the_checkpoint(tmp_path, clip, tiny_checkpoint, monkeypatch):
    """calibrate --frames without --model-type takes it from the checkpoint's keys, as the other commands do; a
    SAM checkpoint there is refused, naming what it is."""
    import sam_sparse.models

    built = []

    def small(model_type, checkpoint=None, **kwargs):
        built.append(model_type)
        return sam_sparse.models.build.build_video_predictor(model_type, checkpoint, image_size=128, **kwargs)

    monkeypatch.setattr(sam_sparse.models, "build_video_predictor", small)
    out = tmp_path / "mem.yaml"
    res = calibrate_cli("--checkpoint", tiny_checkpoint, "--frames", clip, "--density", "0.5", "--block-size", "16",
                        "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output + res.stderr
    assert built == [None] and "Calibrating sam2.1_hiera_t's memory attention" in res.stderr
    vit = tmp_path / "vit.pt"
    torch.save(build_model("mobile_sam").state_dict(), vit)
    res = calibrate_cli("--checkpoint", vit, "--frames", clip, "--density", "0.5", "--out", tmp_path / "v.yaml")
    assert res.exit_code == 2 and "is for mobile_sam, which has no video predictor" in res.stderr, res.stderr


def test_a_patched_predictor_is_refused_before_any_frame(tmp_path):
    """Memory calibration measures SAM 2's own attention: a predictor patched with a sparse memory policy
    would give statistics of that policy's outputs. video_parity fails a bad policy before a whole run."""
    from sam_sparse import video_parity
    from sam_sparse.policy import PolicyError

    pred = small_video_predictor(0)
    frames = write_frames(tmp_path / "clip", 3)
    handle = patch_sam(pred, "memory-local")
    with pytest.raises(ValueError, match="needs the unpatched predictor"):
        measure_memory(pred, str(frames))
    handle.restore()
    with pytest.raises(PolicyError, match="no-such-policy"):
        video_parity(pred, frames, [{"frame": 0, "obj_id": 1, "points": [[40, 45]], "labels": [1]}], "no-such-policy")
