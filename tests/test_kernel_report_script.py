"""scripts/kernel_report.py on a CPU: it compiles the attention kernel for sm_90a with the launcher's constexprs
(Triton's own ptxas, no GPU), so it breaks whenever the kernel's arguments change and it is not told; it
had (split-K's constexprs). Two layers, one config: registers and the loop's pipelined K / V copies."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_report_compiles_the_kernel_for_hopper(tmp_path):
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas (not an x86_64 / aarch64 Linux wheel)")
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--quick", "--maxnreg", "0",
                           "--case", "global, no bias", "--case", "d72, 64 + 16", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| global")]
    assert [r[0].strip() for r in rows] == ["global, no bias", "global d72, 64 + 16 from 56 (OVERLAP_SECOND_CHUNK)"]
    for label, config, _, registers, spill, shared, copies, loop, serialized in rows:
        assert 0 < int(registers) <= 255 and int(shared) > 0, (label, registers, shared)
        assert int(loop) > 0 and serialized.strip() == "no", (label, serialized)
    # K and V pipelined in the main loop: one async copy each per head-dim chunk.
    assert [int(r[6]) for r in rows] == [2, 4]


def test_hiera_layers_keep_their_wgmma_pipelined(tmp_path):
    """ptxas serializes every wgmma of a kernel where a non-wgmma instruction writes accumulator registers while one
    may be in flight (its warning C7515). Two forms of the kernel did so on Hiera's layers: the overlapping head-dim
    chunk's q zeroed in registers (head dim 72, hiera_l) and the key tail's QK after the loop (hiera_b+'s 14 x 14
    windows). Neither may come back."""
    triton = pytest.importorskip("triton")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("this Triton ships no ptxas (not an x86_64 / aarch64 Linux wheel)")
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--quick", "--maxnreg", "0",
                           "--case", "(Hiera)", "--case", "(hiera_l)", "--case", "d72, 64 + 16", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r[0].strip(): r[-1].strip() for r in (line.split("|")[1:-1] for line in out.read_text().splitlines()[4:])}
    assert len(rows) == 4 and set(rows.values()) == {"no"}, rows


def test_kernel_report_refuses_an_unknown_layer():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--case", "no such layer"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no layer label contains it" in proc.stderr, proc.stderr[-2000:]
