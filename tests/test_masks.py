"""Mask patterns on small grids: golden masks written by hand, densities, token orders."""

import pytest
import torch

from sam_sparse.geometry import LayerGeometry, Prompts
from sam_sparse.masks import (
    and_masks,
    block_context,
    block_side,
    diagonal,
    evaluate,
    local2d,
    mask_density,
    or_masks,
    sink,
    tile_permutation,
)
from sam_sparse.policy import PATTERNS, PatternSpec
from sam_sparse.sam_layers import sam_layer_geometries


def grid_layer(grid=(4, 8), block_size=4, tile=(2, 2), kind="encoder.global", heads=1, name="blocks.0.attn"):
    """Self-attention over a small grid. Default: 4x8 tokens in 2x2 tiles -> 8 blocks on a 2x4 tile grid:

        block:  0 1 2 3
                4 5 6 7
    """
    n = grid[0] * grid[1]
    return LayerGeometry(name, kind, heads, n, n, grid, grid, block_size, tile)


def M(*rows):
    """Block mask from strings of 0/1, one per query block: M("10", "01") -> (2, 2) bool."""
    return torch.tensor([[c == "1" for c in r] for r in rows])


def run(spec_or_mod, layer, prompts=None, **params):
    mod = PatternSpec(spec_or_mod, params).build() if isinstance(spec_or_mod, str) else spec_or_mod
    return evaluate(mod, block_context(layer, prompts))


# --- golden masks on the 2x4 tile grid --------------------------------------------------------------


def test_local2d_radius1_is_the_3x3_tile_neighbourhood():
    got = run("local2d", grid_layer(), radius=1)
    want = M("11001100", "11101110", "01110111", "00110011", "11001100", "11101110", "01110111", "00110011")
    assert torch.equal(got[0, 0], want)


def test_local2d_radius0_is_the_diagonal_and_metrics_differ_off_axis():
    assert torch.equal(run("local2d", grid_layer(), radius=0)[0, 0], torch.eye(8, dtype=torch.bool))
    # manhattan radius 1 drops the diagonal neighbours that chebyshev keeps
    got = run("local2d", grid_layer(), radius=1, metric="manhattan")
    want = M("11001000", "11100100", "01110010", "00110001", "10001100", "01001110", "00100111", "00010011")
    assert torch.equal(got[0, 0], want)


def test_axial_keeps_the_tile_row_and_column():
    got = run("axial", grid_layer())
    want = M("11111000", "11110100", "11110010", "11110001", "10001111", "01001111", "00101111", "00011111")
    assert torch.equal(got[0, 0], want)


def test_dilated_keeps_every_second_tile_through_the_query():
    got = run("dilated", grid_layer(), stride=2)
    want = M("10100000", "01010000", "10100000", "01010000", "00001010", "00000101", "00001010", "00000101")
    assert torch.equal(got[0, 0], want)


def test_sink_keeps_the_first_key_blocks():
    got = run("sink", grid_layer(), blocks=2)
    assert torch.equal(got[0, 0], M(*["11000000"] * 8))


def test_nearest_keeps_the_closest_blocks_ties_to_lower_index():
    got = run("nearest", grid_layer(), density=0.25)  # 2 of 8 per row: itself and its nearest neighbour
    want = M("11000000", "11000000", "01100000", "00110000", "10001000", "01000100", "00100010", "00010001")
    assert torch.equal(got[0, 0], want)


def test_hierarchical_gives_each_head_group_its_radius():
    got = run("hierarchical", grid_layer(heads=4), radii=[0, 0, 1, "all"])
    assert got.shape == (1, 4, 8, 8)
    assert torch.equal(got[0, 0], torch.eye(8, dtype=torch.bool)) and torch.equal(got[0, 1], got[0, 0])
    assert torch.equal(got[0, 2], run("local2d", grid_layer(), radius=1)[0, 0])
    assert bool(got[0, 3].all())


def test_hybrid_first_heads_dense_others_sparse():
    got = run("hybrid", grid_layer(heads=4), dense_fraction=0.5, sparse={"pattern": "local2d", "params": {"radius": 0}})
    assert [bool(got[0, h].all()) for h in range(4)] == [True, True, False, False]
    assert torch.equal(got[0, 3], torch.eye(8, dtype=torch.bool))


def test_random_is_seeded_exact_per_row_and_keeps_the_diagonal():
    layer = grid_layer(heads=3)
    a = run("random", layer, density=0.5, seed=1)
    assert a.shape == (1, 3, 8, 8)
    assert (a.sum(-1) == 4).all()  # round(0.5 * 8) per query block and head
    assert a[0, :, torch.arange(8), torch.arange(8)].all()
    assert torch.equal(a, run("random", layer, density=0.5, seed=1))
    assert not torch.equal(a, run("random", layer, density=0.5, seed=2))
    assert not torch.equal(a[0, 0], a[0, 1])  # heads draw independently


def test_and_or_compose_mask_mods():
    near, first = local2d(0), sink(1)
    layer = grid_layer()
    assert torch.equal(run(near, layer), run(diagonal(), layer))
    assert torch.equal(run(or_masks(near, first), layer)[0, 0], torch.eye(8, dtype=torch.bool) | M(*["10000000"] * 8))
    assert torch.equal(run(and_masks(near, first), layer)[0, 0], M("10000000", *["00000000"] * 7))
    # the same through a spec: any_of / all_of
    spec = PatternSpec("any_of", items=(PatternSpec("local2d", {"radius": 0}), PatternSpec("sink")))
    assert torch.equal(evaluate(spec.build(), block_context(layer)), run(or_masks(near, first), layer))


# --- token orders -----------------------------------------------------------------------------------


def test_raster_blocks_are_rows_and_radius1_is_a_band():
    layer = grid_layer(grid=(4, 4), block_size=4, tile=None)  # each block is one row of the grid
    got = run("local2d", layer, radius=1)
    assert torch.equal(got[0, 0], M("1100", "1110", "0111", "0011"))
    # axial is dense in raster order: every block spans every column
    assert bool(run("axial", layer).all())


def test_tiles_make_each_block_a_compact_patch():
    side = block_side((64, 64), 128, (8, 16), "cpu")
    assert torch.equal(side.hi[0] - side.lo[0], torch.tensor([8.0, 16.0]))  # an 8x16 patch
    assert torch.equal(side.lattice[5], torch.tensor([1, 1]))  # tile row 1, col 1 of a 8x4 tile grid
    raster = block_side((64, 64), 128, None, "cpu")
    assert torch.equal(raster.hi[0] - raster.lo[0], torch.tensor([2.0, 64.0]))  # two full rows
    # the tile order is geometry.tile_permutation's
    perm = tile_permutation(64, 64, 8, 16)
    assert int(perm[128]) == 16  # block 1 starts at raster token (0, 16)


def test_tiled_vs_raster_local2d_on_vit_b_global():
    for tile, want in ((None, 94), ((8, 16), 220)):  # raster: band of 3 blocks; tiles: 3x3 tiles
        layer = LayerGeometry("g", "encoder.global", 12, 4096, 4096, (64, 64), (64, 64), 128, tile)
        got = run("local2d", layer, radius=1)
        assert int(got.sum()) == want


def test_window_layer_raster_blocks_with_a_partial_last_block():
    layer = grid_layer(grid=(14, 14), block_size=128, tile=None, kind="encoder.window")
    side = block_side((14, 14), 128, None, "cpu")
    assert side.tokens.tolist() == [128, 68]
    # the two blocks' centroids are 0.65 block heights apart: radius 0 keeps the diagonal, 1 everything
    assert torch.equal(run("local2d", layer, radius=0)[0, 0], M("10", "01"))
    assert bool(run("local2d", layer, radius=1).all())


# --- prompt-dependent and layer-kind-aware patterns --------------------------------------------------


def token_to_image(kind="decoder.token_to_image"):
    # 3 prompt/output tokens attend to an 8x4 raster image grid in blocks of 4 = one grid row each
    return LayerGeometry("t2i", kind, 2, 3, 32, None, (8, 4), 4)


def image_to_token():
    return LayerGeometry("i2t", "decoder.image_to_token", 2, 32, 3, (8, 4), None, 4)


PROMPTS = Prompts(
    points=torch.tensor([[[1.5, 3.5]], [[float("nan"), float("nan")]]]),  # row 0: point on grid row 3; row 1: padding
    boxes=torch.tensor([[float("nan")] * 4, [0.0, 6.0, 1.0, 7.0]]),  # row 1: box over grid rows 6-7
)


def test_region_focused_on_token_to_image_keeps_key_rows_near_the_prompts_plus_background():
    got = run("region_focused", token_to_image(), PROMPTS, radius=1, background_stride=4)
    assert got.shape == (2, 1, 1, 8)
    # row 0: rows 2, 3, 4 (less than one block from 3.5) + background rows 0, 4; row 1: rows 5, 6, 7 + 0, 4
    assert torch.equal(got[:, 0, 0], M("10111000", "10001111"))


def test_region_focused_on_image_to_token_keeps_query_rows_near_the_prompts():
    got = run("region_focused", image_to_token(), PROMPTS, radius=1, background_stride=0)
    assert got.shape == (2, 1, 8, 1)
    assert torch.equal(got[:, 0, :, 0], M("00111000", "00000111"))


def test_region_focused_without_prompts_is_dense():
    assert bool(run("region_focused", token_to_image()).all())
    assert bool(run("region_focused", grid_layer()).all())


def test_image_to_prompt_sparsifies_image_to_image_only():
    got = run("image_to_prompt", grid_layer(), image_sparsity=0.75)
    assert torch.equal(got, run("nearest", grid_layer(), density=0.25))
    window = grid_layer(kind="encoder.window")
    assert bool(run("image_to_prompt", window, image_sparsity=0.75).all())
    assert not bool(run("image_to_prompt", window, image_sparsity=0.75, windows=True).all())
    assert bool(run("image_to_prompt", token_to_image(), image_sparsity=0.75).all())


def test_grid_patterns_refuse_layers_without_image_tokens_on_both_sides():
    from sam_sparse.policy import PolicyError

    with pytest.raises(PolicyError, match="needs image tokens on both sides.*query side"):
        run("local2d", token_to_image())


# --- densities --------------------------------------------------------------------------------------


def test_mask_density_weighs_partial_blocks_by_tokens():
    layer = grid_layer(grid=(14, 14), block_size=128, tile=None, kind="encoder.window")
    eye = torch.eye(2, dtype=torch.bool)[None, None]
    assert mask_density(eye, layer) == pytest.approx((128**2 + 68**2) / 196**2)
    assert mask_density(None, layer) == 1.0
    assert mask_density(torch.ones(1, 1, 2, 2, dtype=torch.bool), layer) == pytest.approx(1.0)
    # averaged over heads and batch rows
    two = torch.stack([eye[0, 0], torch.ones(2, 2, dtype=torch.bool)])[None]
    assert mask_density(two, layer) == pytest.approx(((128**2 + 68**2) / 196**2 + 1) / 2)


def test_mask_density_equals_block_density_for_full_blocks():
    got = run("local2d", grid_layer(), radius=1)
    assert mask_density(got, grid_layer()) == pytest.approx(got.float().mean().item())


# --- pattern registry and SAM geometry ---------------------------------------------------------------


def test_every_required_pattern_is_registered():
    for name in ("dense", "local2d", "axial", "dilated", "sink", "random", "hierarchical", "hybrid", "image_to_prompt", "region_focused"):
        assert name in PATTERNS


def test_pattern_spec_fills_defaults_and_is_hashable():
    spec = PatternSpec("local2d", {"radius": 2})
    assert spec.kwargs == {"radius": 2, "metric": "chebyshev"}
    assert spec == PatternSpec("local2d", {"radius": 2, "metric": "chebyshev"})
    hash(PatternSpec("hybrid"))


@pytest.mark.parametrize(
    "model, n_global, heads, global_names",
    [("vit_b", 4, 12, (2, 5, 8, 11)), ("vit_l", 4, 16, (5, 11, 17, 23)), ("vit_h", 4, 16, (7, 15, 23, 31))],
)
def test_sam_layer_geometries(model, n_global, heads, global_names):
    layers = sam_layer_geometries(model)
    glob = [l for l in layers if l.kind == "encoder.global"]
    assert [l.name for l in glob] == [f"image_encoder.blocks.{i}.attn" for i in global_names]
    assert [l.layer_index for l in glob] == [0, 1, 2, 3]
    assert all(l.num_heads == heads and l.q_grid == (64, 64) and l.q_blocks == 32 for l in glob)
    win = [l for l in layers if l.kind == "encoder.window"]
    assert all(l.seqlen_q == 196 and l.q_blocks == 2 for l in win)
    dec = [l for l in layers if l.kind.startswith("decoder")]
    assert len(dec) == 7 and all(l.num_heads == 8 for l in dec)
    assert dec[-1].name == "mask_decoder.transformer.final_attn_token_to_image"
    i2t = next(l for l in dec if l.kind == "decoder.image_to_token")
    assert (i2t.seqlen_q, i2t.seqlen_k, i2t.q_grid, i2t.k_grid) == (4096, 7, (64, 64), None)
    tiled = sam_layer_geometries(model, 128, lambda l: (8, 16) if l.kind == "encoder.global" else None)
    assert {l.key_tile for l in tiled if l.kind == "encoder.global"} == {(8, 16)}
