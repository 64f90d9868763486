"""scripts/bench_kernel.py's memory section on a CPU: its argument checks, the band mask it times (built from
block rows and columns), and a dry run that writes the section's rows without a GPU. The timings themselves
run on the GPU machine (docs/benchmarks.md)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernel.py"
_spec = importlib.util.spec_from_file_location("bench_kernel_script", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_band_mask_keeps_the_same_rows_in_every_frame_and_every_pointer():
    frames, pointers, r = 7, 64, 3
    m = bench.memory_band_mask(frames, pointers, r)
    assert m.shape == (1, 1, 32, 225) and m.dtype == torch.bool  # 7 * 32 frame blocks + 1 pointer block
    for i in range(32):
        row = m[0, 0, i]
        assert row[224], "every query block keeps the pointer tokens"
        for f in range(frames):
            kept = [j for j in range(32) if row[f * 32 + j]]
            assert kept == [j for j in range(32) if abs(j - i) <= r], (i, f, kept)
    # Memory without pointers, and pointers that spill into a second block.
    assert bench.memory_band_mask(2, 0, 0).shape[-1] == 64
    assert bench.memory_band_mask(1, 200, 0)[0, 0, 0, 32:].all()
    with pytest.raises(ValueError, match="multiple of block"):
        bench.memory_band_mask(1, 0, 1, frame_tokens=100)


def test_band_radius_lands_near_the_density_asked():
    nk = 7 * 4096 + 64
    for target in (0.1, 0.25, 0.5):
        r = bench.band_radius(target, 7, 64)
        got = bench.kept_pairs(bench.memory_band_mask(7, 64, r), nk) / (4096 * nk)
        assert abs(got - target) < 0.04, (target, r, got)
    # kept_pairs counts the partial last key block by its real keys: dense = every pair.
    assert bench.kept_pairs(torch.ones(1, 1, 32, 225, dtype=torch.bool), nk) == 4096 * nk


def test_varlen_objects_spread_over_one_to_seven_frames():
    frames = bench.varlen_frames(16)
    assert len(frames) == 16 and min(frames) == 1 and max(frames) == 7 and frames == sorted(frames)
    assert all(4 <= bench.varlen_pointers(f) <= 64 for f in frames)


def test_dry_run_writes_the_memory_rows(tmp_path):
    out = tmp_path / "sub" / "kernel.md"
    bench.main(["--section", "memory", "--dry-run", "--out", str(out), "--memory-batches", "1,16"])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["shape"].split()[0], r["B"]) for r in rows] == [("cross", 1), ("cross", 16), ("varlen", 16),
                                                               ("self", 1), ("self", 16)]
    assert all(abs(r["density"] - 0.25) < 0.04 for r in rows[:3])
    assert "SAM 2's video memory attention" in out.read_text()


@pytest.mark.parametrize("argv,message", [
    (["--dry-run"], "--dry-run covers the memory section only"),
    (["--section", "memory", "--memory-density", "0"], "--memory-density=0.0: expected a number in"),
    (["--section", "video"], "invalid choice: 'video'"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("default", [False, True])
def test_overlap_columns_compare_the_overlapping_chunk_with_the_plain_one(monkeypatch, default):
    """The hiera section's overlap columns: none where the flag changes nothing (56), else the times with
    triton_attn.OVERLAP_SECOND_CHUNK on and off and the error of one output against the other; the flag
    keeps its value, whichever it is."""
    seen = []

    def ours(cfg):
        on = bench.triton_attn.OVERLAP_SECOND_CHUNK
        seen.append(on)
        return torch.full((4,), 2.0 if on else 1.0)

    monkeypatch.setattr(bench.triton_attn, "OVERLAP_SECOND_CHUNK", default)
    monkeypatch.setattr(bench, "try_time", lambda fn: (fn(), 0.5 if bench.triton_attn.OVERLAP_SECOND_CHUNK else 0.7)[1])
    assert bench.overlap_columns(56, ours) == {} and bench.triton_attn.OVERLAP_SECOND_CHUNK is default
    cols = bench.overlap_columns(72, ours)
    assert cols == {"overlap chunks": "64 + 16 from 56", "overlap_ms": 0.5, "plain_ms": 0.7, "overlap_err": "5.00e-01"}
    assert seen == [True, False, True, False] and bench.triton_attn.OVERLAP_SECOND_CHUNK is default
