"""What the compiler makes of the attention kernel, without a GPU: registers, spills, shared memory,
whether the K / V loads of the main loop are software-pipelined, and how many instructions one loop step
issues per thread (the SASS between the loop's branch and its target), and whether ptxas serialized the kernel's
wgmma instructions (its warning C7515), for SAM's global layer (rect bias, rel_w hoisted), the same layer without
bias, the window layer (one-hot bias, in-place windows), Hiera's windows (14 x 14 with a key tail, cropped, hiera_l's
16 x 16 at head dim 72), and the global layer without bias at head dims 72 (as one chunk of 128, or as 64 + 16
overlapping) and 80.

Compiles `_attn_fwd` for an sm_90a target with this machine's Triton (ptxas ships with it) through the
same constexprs the launcher would set for those shapes; integer arguments get the specializations the
JIT gives them at run time (head-dim strides of 1, multiples of 16). The Triton here may not be the
GPU machine's: numbers are leads for what the device measures, not measurements of it.

    python scripts/kernel_report.py [--out docs/bench/kernel_report.md] [--maxnreg 0,128] [--case TEXT ...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sam_sparse.kernels import triton_attn  # noqa: E402

FP32_POINTERS = ("WS_O", "WS_L")
POINTERS = ("Q", "K", "V", "Out", "K_PAD", "V_PAD", "DESC_K0", "DESC_K1", "DESC_V0", "DESC_V1", "REL_H", "REL_W")
INT_POINTERS = ("KV_NUM", "KV_IDX", "CU_Q", "CU_K")
UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_rhm", "stride_rwm")

# The launcher's constexprs for three of SAM's layers (vit_b: head dim 64), dense.
COMMON = dict(D_REAL=64, D0=64, D1=0, D1_AT=64, MASK_BLOCK=128, KB_P=16, HAS_MASK=False, VARLEN=False, WINDOW=False,
              WIN_H=1, WIN_W=1, QWIN_H=1, QWIN_W=1, WIN_PAD=False, CROP=False, PACK=1, DOT_PREC="tf32", INTERP=False, RECT_H=1,
              RECT_W=64, W_HOIST=False, USE_WDOT=False, KH_P=16, KW_P=16, EVEN_N=True, TAIL_N=0, TMA=False, ALIGN=8, SPLIT=False,
              KH=64, KW=64, TILE_H=64, TILE_W=64)
CASES = {
    "global, rel-pos (rect, rel_w hoisted)": dict(HAS_BIAS=True, BIAS_PATH=triton_attn.BIAS_RECT, W_HOIST=True),
    "global, no bias": dict(HAS_BIAS=False, BIAS_PATH=triton_attn.BIAS_NONE),
    "window 14x14 in place, rel-pos (one-hot)": dict(HAS_BIAS=True, BIAS_PATH=triton_attn.BIAS_ONEHOT, WINDOW=True,
                                                     WIN_H=14, WIN_W=14, QWIN_H=14, QWIN_W=14, RECT_W=14,
                                                     EVEN_N=False, KH=14, KW=14, TILE_H=14, TILE_W=14),
    "window 14x14 overhanging, rel-pos (one-hot)": dict(HAS_BIAS=True, BIAS_PATH=triton_attn.BIAS_ONEHOT, WINDOW=True,
                                                        WIN_H=14, WIN_W=14, QWIN_H=14, QWIN_W=14, WIN_PAD=True,
                                                        RECT_W=14, EVEN_N=False, KH=14, KW=14, TILE_H=14, TILE_W=14),
    "window 14x14 in place, no bias (Hiera)": dict(HAS_BIAS=False, BIAS_PATH=triton_attn.BIAS_NONE, WINDOW=True,
                                                   WIN_H=14, WIN_W=14, QWIN_H=14, QWIN_W=14, EVEN_N=True, TAIL_N=16,
                                                   KH=1, KW=1, TILE_H=1, TILE_W=1),
    "window 16x16 in place, d72 (hiera_l)": dict(HAS_BIAS=False, BIAS_PATH=triton_attn.BIAS_NONE, WINDOW=True, WIN_H=16,
                                                 WIN_W=16, QWIN_H=16, QWIN_W=16, EVEN_N=True, KH=1, KW=1, TILE_H=1,
                                                 TILE_W=1, D_REAL=72, D0=64, D1=16, D1_AT=56),
    "window 14x14 overhanging, cropped, no bias (Hiera)": dict(HAS_BIAS=False, BIAS_PATH=triton_attn.BIAS_NONE,
                                                               WINDOW=True, WIN_H=14, WIN_W=14, QWIN_H=14, QWIN_W=14,
                                                               WIN_PAD=True, CROP=True, EVEN_N=False, KH=1, KW=1,
                                                               TILE_H=1, TILE_W=1),
    # Head dims that are no power of two, no bias (SAM 2's Hiera; vit_h's 80 for comparison): how the chunks
    # (triton_attn.head_dim_chunks) change the loop.
    "global d72, one chunk of 128 (OVERLAP_SECOND_CHUNK off)": dict(HAS_BIAS=False, BIAS_PATH=triton_attn.BIAS_NONE,
                                                                    D_REAL=72, D0=128, D1=0, D1_AT=128),
    "global d72, 64 + 16 from 56 (OVERLAP_SECOND_CHUNK)": dict(HAS_BIAS=False, BIAS_PATH=triton_attn.BIAS_NONE,
                                                               D_REAL=72, D0=64, D1=16, D1_AT=56),
    "global d80, 64 + 16 (vit_h)": dict(HAS_BIAS=False, BIAS_PATH=triton_attn.BIAS_NONE, D_REAL=80, D0=64, D1=16,
                                        D1_AT=64),
}
CONFIGS = [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)]


def compile_one(case: dict, bm: int, bn: int, warps: int, stages: int, maxnreg: int):
    fn = triton_attn._attn_fwd
    names = fn.arg_names
    const = {**COMMON, **case, "BLOCK_M": bm, "BLOCK_N": bn, **{n: 1 for n in UNIT_STRIDES}}
    for v_name, name in (("DV_REAL", "D_REAL"), ("DV0", "D0"), ("DV1", "D1"), ("DV1_AT", "D1_AT")):
        const.setdefault(v_name, const[name])  # V's head dim: q / k's in these cases
    if const["BIAS_PATH"] == triton_attn.BIAS_RECT:
        const["RECT_H"], const["RECT_W"] = max(1, bn // 64), min(bn, 64)
    sig = {}
    for n in names:
        sig[n] = ("constexpr" if n in const else "*bf16" if n in POINTERS else "*i32" if n in INT_POINTERS
                  else "*fp32" if n in FP32_POINTERS else "fp32" if n == "sm_scale" else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if sig[n].startswith("*") or (sig[n] == "i32" and n.startswith("stride"))}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    options = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(ptx: str) -> dict:
    """Registers and spill bytes from ptxas -v on the kernel's PTX (sm_90a), and the number of SASS
    instructions in its main loop (the longest backward branch of cuobjdump's listing)."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        res = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", str(src), "-o", str(cubin)],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    # ptxas's C7515: a non-wgmma instruction writes accumulator registers while a wgmma may be in flight, so it
    # serializes every wgmma of the kernel (an overlapping chunk's q zeroed in registers, a key tail's QK after the
    # loop did: docs/benchmarks.md, runs 122-125).
    return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=int(spill.group(1)) if spill else None,
                loop_instructions=loop_instructions(sass), serialized="C7515" in text)


def loop_instructions(sass: str) -> Optional[int]:
    """Instructions between the target of the longest backward branch and the branch: the main loop."""
    addrs, loop = [], None
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if not m:
            continue
        at = int(m.group(1), 16)
        addrs.append(at)
        jump = re.search(r"\bBRA\s+(?:\S+\s+)?0x([0-9a-f]+)", m.group(2))
        if jump and int(jump.group(1), 16) < at and (loop is None or at - int(jump.group(1), 16) > loop[1] - loop[0]):
            loop = (int(jump.group(1), 16), at)
    return None if loop is None else sum(loop[0] <= a <= loop[1] for a in addrs)


def loop_async_copies(ttgir: str) -> int:
    """async_copy_global_to_local ops inside the kernel's scf.for: K and V pipelined gives 2 (or 4 with
    a split head dim); 0 means the main loop waits on plain loads every step."""
    body = ttgir[ttgir.find("scf.for"):]
    body = body[:body.find("scf.yield")]
    return body.count("async_copy_global_to_local")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="also write the table to this markdown file")
    ap.add_argument("--maxnreg", default="0,128", help="register caps to compile with (0: none)")
    ap.add_argument("--case", action="append", default=None,
                    help="only the layers whose label contains this text (repeatable; default: every layer)")
    ap.add_argument("--quick", action="store_true", help="only the first launch config (64 x 64, 4 warps, 3 stages)")
    args = ap.parse_args()
    cases = {label: case for label, case in CASES.items() if not args.case or any(c in label for c in args.case)}
    if not cases:
        ap.error(f"--case {args.case}: no layer label contains it; the labels are: {'; '.join(CASES)}")
    lines = [f"Off-device compile for sm_90a, Triton {triton.__version__}, bf16, head dim 64 unless the layer says.", "",
             "| layer | BLOCK_M x BLOCK_N, warps, stages | maxnreg | registers | spill bytes | shared memory (B) "
             "| K/V async copies in the loop | SASS instructions per loop step | wgmma serialized (C7515) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for label, case in cases.items():
        for bm, bn, warps, stages in CONFIGS[:1] if args.quick else CONFIGS:
            if case.get("WINDOW") and bn > 64:
                continue
            for maxnreg in (int(x) for x in args.maxnreg.split(",")):
                k = compile_one(case, bm, bn, warps, stages, maxnreg)
                rep = ptxas_report(k.asm["ptx"])
                lines.append(f"| {label} | {bm}x{bn}, {warps}, {stages} | {maxnreg or '-'} | {rep['registers']} | "
                             f"{rep['spill_bytes']} | {k.metadata.shared} | {loop_async_copies(k.asm['ttgir'])} | "
                             f"{rep['loop_instructions']} | {'yes' if rep['serialized'] else 'no'} |")
                print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
