"""scripts/bench_amg.py with a SAM 2 model on the CPU: the vit section takes a SAM 2.1 type, times sam2's own
SAM2AutomaticMaskGenerator beside sam_sparse.maskgen's modes, and a section that fails makes the exit status 1.
The timings themselves run on the GPU machine (docs/benchmarks.md)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sam2", reason="SAM 2 tests need the sam2 extra (README: install)")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_amg.py"


def run(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--quick", *args],
                          check=False, capture_output=True, text=True, env=env, timeout=600)


def rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "bench_amg.jsonl").read_text().splitlines()]


def test_vit_section_takes_a_sam2_model_type(tmp_path):
    proc = run(tmp_path, "--only", "vit", "--vit-models", "sam2.1_hiera_t")
    assert proc.returncode == 0, proc.stderr[-3000:]
    timed = [r for r in rows(tmp_path) if r.get("section") == "vit" and "config" in r]
    assert [r["config"] for r in timed] == ["sam2", "exact", "fast, model decoder", "fast"], timed
    for r in timed:
        assert r["model"] == "sam2.1_hiera_t" and r["images"] == 1, r
        assert r["encoder_ms"] > 0 and r["decoder_ms"] > 0 and r["total_ms"] > 0, r
    assert "| sam2.1_hiera_t |" in (tmp_path / "bench_amg.md").read_text()


def test_the_reference_is_the_families_own_generator():
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
    from segment_anything import SamAutomaticMaskGenerator

    from sam_sparse.models import build_model

    spec = importlib.util.spec_from_file_location("bench_amg_script", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    sam2 = bench.TimedReference(build_model("sam2.1_hiera_t"), "cpu", profile=True, points_per_side=2)
    assert type(sam2.generator) is SAM2AutomaticMaskGenerator
    assert sam2.generator.predictor._predict.__qualname__.endswith("_timed.<locals>.call")
    sam = bench.TimedReference(build_model("vit_b"), "cpu", profile=True, points_per_side=2)
    assert type(sam.generator) is SamAutomaticMaskGenerator
    assert sam.generator.predictor.predict_torch.__qualname__.endswith("_timed.<locals>.call")


def test_a_failed_section_sets_the_exit_status(tmp_path):
    proc = run(tmp_path, "--only", "vit", "--vit-models", "sam2.1_hiera_x")
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "section(s) vit failed" in proc.stderr
    errors = [r for r in rows(tmp_path) if "error" in r]
    assert len(errors) == 1 and "sam2.1_hiera_x" in errors[0]["error"], errors
