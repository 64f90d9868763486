"""Compile the factored decoder's kernels (sam_sparse/kernels/triton_upscale.py, triton_few_keys.py) for an
H100 / H200 (sm_90a) without a GPU, and say per launch config how many registers and spill bytes ptxas
gives it: one JSON line each.

The interpreter runs kernels as NumPy code and so never meets what only the compiler checks (a global read
inside a kernel, for one), nor register pressure. Run in its own process with TRITON_INTERPRET=0 (the test
suite's process runs the interpreter): python tests/hopper_compile.py [--skips | --few-keys]
"""

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sam_sparse.kernels import triton_few_keys, triton_upscale  # noqa: E402

POINTERS = ["X", "W1", "B1", "LNW", "LNB", "W2", "B2", "HYP", "OUT", "ADD1", "ADD2"]
# A 64 x 64 x 256 input, 1024 samples, 3 projections; the skip maps shared (batch stride 0), as SAM 2's.
VALUES = dict(stride_xb=1 << 20, stride_xp=256, stride_xc=1, stride_hb=96, stride_hm=32, stride_ob=196608,
              stride_om=65536, HW=4096, GW=64)
SKIP_VALUES = dict(stride_1b=0, stride_1c=16384, stride_1h=128, stride_1w=1, stride_2b=0, stride_2c=65536,
                   stride_2h=256, stride_2w=1)
# The few-key kernel at SAM's image-to-token shape: 4096 rows of 256 channels per sample (queries per
# sample, the residual shared), 8 heads of 7 tokens.
FEW_KEYS_POINTERS = ["Q", "K", "KB", "V", "OB", "R", "LNW", "LNB", "POS", "Y", "YP"]
FEW_KEYS_VALUES = dict(stride_qb=1 << 20, stride_qn=256, stride_qc=1, stride_rb=0, stride_rn=256, stride_rc=1,
                       stride_pb=0, stride_pn=256, stride_pc=1, N=4096)


def ptxas_usage(ptx: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                             text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs, spills = re.search(r"Used (\d+) registers", out), re.search(r"(\d+) bytes spill stores", out)
    return dict(registers=int(regs.group(1)), spill_bytes=int(spills.group(1)) if spills else 0)


def compile_all(autotuned, pointers: list, floats: list, values: dict, consts: dict, configs: list) -> None:
    kern = autotuned.fn  # the JITFunction under the autotuner
    consts = {**consts, **{k: 1 for k, v in values.items() if v == 1}}  # Triton specializes arguments equal to 1
    signature = {name: "i32" for name in kern.arg_names}
    signature.update({name: "*fp32" for name in pointers}, **{name: "fp32" for name in floats})
    attrs = {(kern.arg_names.index(n),): [["tt.divisibility", 16]]
             for n in pointers + [k for k, v in values.items() if v and v % 16 == 0]}
    for cfg in configs:
        c = {**consts, **cfg.kwargs}
        sig = {**signature, **{k: "constexpr" for k in c}}
        src = ASTSource(fn=kern, signature=sig, constexprs={(kern.arg_names.index(k),): v for k, v in c.items()},
                        attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        print(json.dumps(dict(config=cfg.kwargs, num_warps=cfg.num_warps, shared_bytes=compiled.metadata.shared,
                              **ptxas_usage(compiled.asm["ptx"]))), flush=True)


def main(args: list) -> None:
    if "--few-keys" in args:
        consts = dict(C=256, H=8, T=7, T_P=8, HAS_KB=True, HAS_OB=True, HAS_POS=True, DOT_PREC="tf32x3")
        configs = triton_few_keys.prune(triton_few_keys.CONFIGS, {"N": 4096}, C=256)
        compile_all(triton_few_keys._few_keys_kernel, FEW_KEYS_POINTERS, ["scale", "eps"], FEW_KEYS_VALUES,
                    consts, configs)
        return
    skips = "--skips" in args
    consts = dict(C=256, C1=64, C2=32, M=3, M_P=16, HAS_ADD1=skips, HAS_ADD2=skips, CONV_PREC="tf32x3",
                  DOT_PREC="tf32x3")  # 3xTF32 everywhere: the most registers
    configs = triton_upscale.prune(triton_upscale.CONFIGS, {"HW": VALUES["HW"]}, C=consts["C"])
    compile_all(triton_upscale._upscale_kernel, POINTERS, ["eps"], {**VALUES, **(SKIP_VALUES if skips else {})},
                consts, configs)


if __name__ == "__main__":
    main(sys.argv[1:])
