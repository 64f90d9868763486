"""Calibration of SAM 2's video memory attention: the measured block mass against float64 attention of the
q / k SAM 2 itself attends with, planted locality found, frames-folder checks."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("sam2", reason="SAM 2 tests need the sam2 extra (README: install)")

from sam2.build_sam import build_sam2_video_predictor
from sam2.modeling.sam import transformer as sam2_transformer
from sam2_helpers import photo, sharpen_attention_

from sam_sparse.calibration import (
    MemoryRecorder,
    choose_memory_radius,
    measure_memory,
    memory_kept,
    memory_mask,
    memory_policy,
    video_frames,
)
from sam_sparse.geometry import MemoryLayout
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
    for name in ("00010.jpg", "00002.jpeg", "notes.txt"):
        (d / name).write_bytes(b"x")
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
