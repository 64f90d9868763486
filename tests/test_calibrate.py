"""Calibration: measured statistics against float64 attention, planted structures it must find, the
policies it writes, and the CLI command (small random ViT SAMs; the CLI run uses MobileSAM's weights)."""

import math

import numpy as np
import pytest
from PIL import Image
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from patch_helpers import make_image, small_sam
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

from sam_sparse import load_policy
from sam_sparse.calibration import calibrate, choose, measure
from sam_sparse.cli import main
from sam_sparse.masks import tile_permutation
from sam_sparse.policy import Policy


def seeded():
    seed = torch.seed() % 2**31
    return seed, np.random.default_rng(seed)


# --- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["tiles", "raster"])
def test_measured_mass_is_the_float64_attention_summed_into_blocks(order):
    """The recorder's per-block mass for a global layer equals SAM's own attention (add_decomposed_rel_pos,
    softmax) computed in float64 from the layer's input, summed into (query block, key block)."""
    seed, rng = seeded()
    sam = small_sam(seed=seed % 1000)
    attn = sam.image_encoder.blocks[1].attn
    seen = []
    hook = attn.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    image = make_image(seed=seed % 1000)
    try:
        stats, probe, _ = measure(sam, [image], kinds=("encoder.global",), block_size=16, token_order=order)
    finally:
        hook.remove()
    x = seen[0].double()  # (1, 16, 16, C)
    B, H, W, C = x.shape
    nH = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight.detach().double(), attn.qkv.bias.detach().double()).reshape(B, H * W, 3, nH, -1)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).reshape(3, B * nH, H * W, -1).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    logits = add_decomposed_rel_pos(logits, q, attn.rel_pos_h.detach().double(), attn.rel_pos_w.detach().double(), (H, W), (H, W))
    p = logits.softmax(dim=-1).reshape(nH, H * W, H * W)
    if order == "tiles":
        perm = tile_permutation(H, W, 4, 4)
        p = p[:, perm][:, :, perm]
    expected = p.reshape(nH, 16, 16, 16, 16).sum(dim=(2, 4)).detach()  # (H, QB, KB)
    got = stats["image_encoder.blocks.1.attn"].mass
    assert got.shape == expected.shape
    err = (got - expected).abs()
    assert float(err.max()) < 2e-4 * 16, f"seed {seed}: max abs err {float(err.max())}"
    rows = (got.sum(-1) - 16).abs()  # every query block holds 16 queries, each contributing 1
    assert float(rows.max()) < 1e-3, f"seed {seed}: a row does not sum to its queries"


def test_decoder_mass_is_bucketed_by_distance_to_the_prompt():
    sam = small_sam()
    image = make_image()
    stats, _, _ = measure(sam, [image], kinds=("decoder.token_to_image",), block_size=16,
                          prompts=[np.array([[8.0, 8.0], [200.0, 150.0]], dtype=np.float32)])
    st = stats["mask_decoder.transformer.layers.0.cross_attn_token_to_image"]
    assert st.calls == 2  # two point prompts, one decoder batch row each
    assert st.bucket_mass.shape[0] == 8
    # Each query token puts mass 1 somewhere: the buckets hold (tokens per call) x calls.
    tokens = float(st.bucket_mass.sum()) / 8 / st.calls
    assert tokens == pytest.approx(round(tokens), abs=1e-4) and round(tokens) >= 5
    assert float(st.bucket_share.sum()) == pytest.approx(st.calls)  # token shares: 1 per call
    assert float(st.bucket_share[0]) > 0  # the blocks under the points


# --- planted structure ------------------------------------------------------------------------------


PLANTED_PX = 512


def _planted_sam(local: float = 0.0, sink: float = 0.0, shift: int = 4):
    """A one-block global-attention ViT SAM whose attention is set by hand: q is the constant e_0 of each
    head (qkv weights zero), so logits are (1) the rel-pos terms, here -local * (|d_row| + |d_col + shift|):
    each token looks at the token `shift` columns to its right (one 4x4 tile over: local, but not in
    its own block, which every policy keeps anyway), and (2) a key term on the 16 tokens of the first
    4x4 tile (block 0 in tiled order), raised by `sink`."""
    # 32x32 tokens: an 8x8 lattice of 4x4 tiles at block size 16. (At 1024 px, 64x64 tokens, the greedy
    # choice over 961 offsets took minutes per test and no assertion needs it.)
    sam = small_sam(depth=1, global_attn_indexes=(0,), window_size=0, img_size=PLANTED_PX)
    enc = sam.image_encoder
    attn = enc.blocks[0].attn
    C, nH = attn.qkv.in_features, attn.num_heads
    hd = C // nH
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.bias.zero_()
        for h in range(nH):
            attn.qkv.bias[h * hd] = 1.0  # q = e_0 for every token and head
            attn.qkv.weight[C + h * hd, 0] = sink  # k_0 = sink * (normalized feature 0)
        d = (torch.arange(attn.rel_pos_h.shape[0]) - (attn.rel_pos_h.shape[0] - 1) // 2).float()  # q - k
        attn.rel_pos_h.zero_()
        attn.rel_pos_w.zero_()
        attn.rel_pos_h[:, 0] = -local * d.abs()
        attn.rel_pos_w[:, 0] = -local * (d + shift).abs()
        enc.patch_embed.proj.weight.zero_()
        enc.patch_embed.proj.bias.zero_()
        enc.pos_embed.zero_()
        enc.pos_embed[0, :4, :4, 0] = 50.0 if sink else 0.0  # the first 4x4 tile: block 0
    return sam


def _retained(stats, policy):
    st = next(iter(stats.values()))
    mask = policy.block_mask(st.layer)
    keep = torch.ones_like(st.mass, dtype=torch.bool) if mask is None else mask[0].expand_as(st.mass).cpu()
    return ((st.mass * keep).sum(dim=(1, 2)) / st.mass.sum(dim=(1, 2))).tolist()


def test_planted_local_attention_is_found():
    sam = _planted_sam(local=6.0)
    images = [make_image(PLANTED_PX, seed=i) for i in range(2)]
    policy, report = calibrate(sam, images, target_density=0.3, layers=("encoder.global",), block_size=16)
    (kind, heads), = report.layers.values()
    assert kind == "encoder.global"
    assert report.layer_density("image_encoder.blocks.0.attn") == pytest.approx(0.3, abs=0.05)
    assert min(c.retained for c in heads) >= 0.99
    assert all((0, -1) in c.offsets and not c.sinks for c in heads)  # the tile to the right
    # The same density drawn at random keeps about that share of the mass.
    stats, _, _ = measure(sam, images[:1], kinds=("encoder.global",), block_size=16)
    random = Policy.from_dict({"name": "r", "block_size": 16, "token_order": "tiles",
                               "rules": [{"match": "encoder.global", "pattern": "random", "params": {"density": 0.3}}]})
    assert max(_retained(stats, random)) < 0.6  # 64 key blocks a row: about 0.3, give or take a block or two
    assert min(_retained(stats, policy)) >= 0.99
    # The smallest set that holds 0.99: the tile to the right (and the own block), not the one to the left.
    lean, lean_report = calibrate(sam, images, min_mass=0.99, layers=("encoder.global",), block_size=16)
    lean_heads = lean_report.layers["image_encoder.blocks.0.attn"][1]
    assert all((0, -1) in c.offsets and (0, 1) not in c.offsets for c in lean_heads), [c.offsets for c in lean_heads]
    assert lean_report.layer_density("image_encoder.blocks.0.attn") < 0.1
    assert min(_retained(stats, lean)) >= 0.99  # measured through the written policy's own masks


def test_planted_sink_block_is_found():
    sam = _planted_sam(sink=6.0)
    images = [make_image(PLANTED_PX, seed=3)]
    policy, report = calibrate(sam, images, target_density=0.3, layers=("encoder.global",), block_size=16)
    (_, heads), = report.layers.values()
    assert all(c.sinks[:1] == (0,) for c in heads), [c.sinks for c in heads]
    assert min(c.retained for c in heads) >= 0.99
    # min_mass: the smallest set holding 0.99 is the own block plus the sink, far below density 0.3.
    policy2, report2 = calibrate(sam, images, min_mass=0.99, layers=("encoder.global",), block_size=16)
    assert report2.layer_density("image_encoder.blocks.0.attn") < 0.15
    assert min(c.retained for c in report2.layers["image_encoder.blocks.0.attn"][1]) >= 0.99


def test_dense_attention_stays_dense_under_a_mass_target():
    """Uniform attention (all logits equal): holding 0.99 of it needs 0.99 of the pairs: the head stays dense."""
    sam = _planted_sam()
    policy, report = calibrate(sam, [make_image(PLANTED_PX)], min_mass=0.99, layers=("encoder.global",), block_size=16)
    assert all(c.dense for c in report.layers["image_encoder.blocks.0.attn"][1])
    assert policy.block_mask(next(iter(policy.geometries("vit_b")))) is None


# --- policies it writes ---------------------------------------------------------------------------


def test_calibrated_policy_round_trips_through_yaml(tmp_path):
    sam = small_sam()
    policy, report = calibrate(sam, [make_image(seed=1)], target_density=0.4, block_size=16, points_per_side=2,
                               heldout=[make_image(seed=2)])
    path = tmp_path / "cal.yaml"
    path.write_text(policy.to_yaml())
    again = load_policy(path)
    assert again == policy
    assert "relative_blocks" in path.read_text() and "region_focused" in path.read_text()
    assert report.parity is not None and report.parity.mask_iou  # held-out images were checked
    assert "retained" in str(report)


def test_targets_are_checked_before_any_work():
    sam = small_sam()
    for kwargs in ({}, {"target_density": 0.3, "min_mass": 0.9}, {"target_density": 0.0}, {"min_mass": 1.5},
                   {"target_density": math.nan}):
        with pytest.raises(ValueError, match="target_density|min_mass"):
            calibrate(sam, [make_image()], **kwargs)
    with pytest.raises(ValueError, match="cannot be calibrated"):
        calibrate(sam, [make_image()], target_density=0.3, layers=("decoder.self",))
    with pytest.raises(ValueError, match="exactly one"):
        choose({}, load_policy("dense"))


# --- CLI ------------------------------------------------------------------------------------------


def _run(args):
    return CliRunner().invoke(main, ["calibrate", *args])


@pytest.mark.parametrize("args,message", [
    (["--images", "nowhere/", "--target-density", "0.3"], "no such file or folder"),
    (["--images", "EMPTY", "--target-density", "0.3"], "no images"),
    (["--images", "astronaut", "--target-density", "1.5"], "outside (0, 1]"),
    (["--images", "astronaut", "--min-mass", "0"], "outside (0, 1]"),
    (["--images", "astronaut"], "exactly one of --target-density"),
    (["--images", "astronaut", "--target-density", "0.3", "--min-mass", "0.9"], "exactly one of --target-density"),
])
def test_cli_rejects_bad_input_with_exit_2(tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if a == "EMPTY" else a for a in args]
    res = _run([*args, "--out", str(tmp_path / "p.yaml")])
    assert res.exit_code == 2, res.output + res.stderr
    assert message in res.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_cli_finds_duplicates_and_an_existing_out_before_the_model_loads(tmp_path):
    """Issue 25, item 10: `--images A --images A` held out the duplicate, dropped both and failed after the
    model loaded; an existing --out was replaced silently."""
    from skimage import data

    (tmp_path / "photos").mkdir()
    Image.fromarray(data.coffee()[:64, :64]).save(tmp_path / "photos" / "a.png")
    out = tmp_path / "p.yaml"
    cases = [
        (["--images", "astronaut", "--images", "astronaut"], "image astronaut is already given by --images astronaut"),
        (["--images", "astronaut", "--heldout", "astronaut"], "already given by --images astronaut"),
        (["--images", str(tmp_path / "photos"), "--images", str(tmp_path / "photos" / "a.png")], "is already given by"),
    ]
    for args, message in cases:
        res = _run([*args, "--target-density", "0.3", "--out", str(out)])
        assert res.exit_code == 2 and message in res.stderr, res.output + res.stderr
        assert "Using the built-in default model" not in res.stderr and not out.exists()
    out.write_text("mine")
    res = _run(["--images", "astronaut", "--target-density", "0.3", "--out", str(out)])
    assert res.exit_code == 2 and "already exists; pass --force to replace it" in res.stderr, res.stderr
    assert out.read_text() == "mine"
    res = _run(["--images", "astronaut", "--target-density", "0.3", "--out", str(out), "--force",
                "--checkpoint", str(tmp_path / "missing.pth")])  # --force gets past the check, to the next one
    assert res.exit_code == 2 and "missing.pth" in res.stderr and "already exists" not in res.stderr, res.stderr
    assert out.read_text() == "mine"


def test_cli_rejects_a_bad_output_name(tmp_path):
    res = _run(["--images", "astronaut", "--target-density", "0.3", "--out", str(tmp_path / "p.txt")])
    assert res.exit_code == 2 and ".yaml" in res.stderr


def test_cli_writes_a_policy_that_loads(tmp_path):
    """MobileSAM (real weights): only its decoder is SAM's, so the decoder is calibrated."""
    out = tmp_path / "mine.yaml"
    res = _run(["--images", "astronaut", "--heldout", "coffee", "--target-density", "0.5",
                "--points-per-side", "2", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "calibrate" in res.stderr and "image" in res.stderr  # the progress bar
    policy = load_policy(out)
    assert policy.name == "mine"
    assert "held-out parity" in res.output and "retained" in res.output
    assert "no encoder.global layer" in res.output  # MobileSAM's TinyViT: said, not hidden


# --- the CLI's defaults pass the CLI's own check --------------------------------------------------


@pytest.mark.parametrize("mode", ["--multimask", "--single-mask"])
def test_every_default_policy_passes_verify_on_every_sample_photo(mode):
    """Issue 13's rule: each command's default policy passes `sam-sparse verify` with its default
    thresholds on every sample photo the CLI offers (real MobileSAM weights), single- and multimask."""
    from sam_sparse.cli.amg import DEFAULT_POLICY as amg_default
    from sam_sparse.cli.segment import DEFAULT_POLICY as segment_default  # segment and demo
    from sam_sparse.cli.verify import DEFAULT_IMAGES
    from sam_sparse.segment import SAMPLES

    assert set(DEFAULT_IMAGES) == set(SAMPLES)  # verify's default images are every sample the CLI offers
    for policy in sorted({amg_default, segment_default}):
        res = CliRunner().invoke(main, ["verify", "--policy", policy, mode, "--device", "cpu"])
        assert res.exit_code == 0, f"{policy} {mode}:\n{res.output}\n{res.stderr}"
        assert "PASS" in res.output


def test_bad_arguments_are_refused_before_any_work_and_the_model_is_left_as_found():
    """Wrong model, images, prompts, point grid or targets: a clear error before an image is embedded; and
    whatever fails, a model the user had patched keeps its own handle, enabled."""
    from sam_sparse import patch_sam

    sam, image = small_sam(), make_image()
    handle = patch_sam(sam.image_encoder, "dense")
    with pytest.raises(TypeError, match="calibrate measures a whole model .* got (Sparse)?ImageEncoderViT"):
        calibrate(sam.image_encoder, [image], target_density=0.5, block_size=16)
    assert handle.active and sam.image_encoder._sam_sparse_handle is handle
    handle.restore()
    cases = [
        (dict(images=[image, image[..., 0]]), r"images\[1\]: shape \(\d+, \d+\), dtype uint8; expected an HxWx3 uint8"),
        (dict(prompts=[np.array([[10.0, 10.0]])]), "prompts: 1 point arrays for 2 images"),
        (dict(points_per_side=0), "points_per_side=0: expected an integer >= 1"),
        (dict(min_mass=True, target_density=None), "min_mass=True: expected a number"),
        (dict(layers="encoder.globl"), "layers: encoder.globl cannot be calibrated"),
    ]
    for change, says in cases:
        kwargs = {"images": [image, image], "target_density": 0.5, "block_size": 16, **change}
        with pytest.raises(ValueError, match=says):
            calibrate(sam, kwargs.pop("images"), **kwargs)
    policy, _ = calibrate(sam, [image], target_density=0.5, block_size=16, layers="encoder.global")
    assert not hasattr(sam, "_sam_sparse_handle") and policy.block_size == 16
