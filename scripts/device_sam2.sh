#!/usr/bin/env bash
# One device call for one SAM 2.1 image model (issue 22): sam2's image encoder side by side (unpatched SDPA vs
# patch_sam dense, and local2d-30 at batch 8), bf16, at batch 1 and 8 (eager, compiled), then the host cost of
# its compiled Hiera blocks at batch 1 (bench_runtime's compiledhost, about 150 s) and, with FIRST=1, the first
# call of a patched model in a fresh process. About 550 s for hiera_l: one model per call. No CUDA-graph rows:
# mode="reduce-overhead" fails inside sam2's own image encoder (docs/benchmarks.md, run 70). Every result
# lands in $OUT as it is measured; each step has its own limit.
# Usage: bash scripts/device_sam2.sh COMMIT [MODEL, default sam2.1_hiera_l]
set -u
COMMIT=${1:-unknown}
MODEL=${2:-sam2.1_hiera_l}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
timeout 200 python3 scripts/side_by_side.py --modes eager,compile --impls sa,dense --shapes $MODEL:1 \
    --out $OUT/side_sam2.jsonl 2>&1 | grep '^{' | cut -c1-200
timeout 200 python3 scripts/side_by_side.py --modes eager,compile --impls sa,dense,local2d-30 --shapes $MODEL:8 \
    --out $OUT/side_sam2.jsonl 2>&1 | grep '^{' | cut -c1-200
timeout 240 python3 scripts/bench_runtime.py --only compiledhost${FIRST:+,firstcall} --model $MODEL \
    --sam2-model $MODEL --out $OUT 2>&1 | grep '^{' | cut -c1-250
