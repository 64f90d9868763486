#!/usr/bin/env bash
# One device call for one SAM 2.1 image model (issue 22's table): sam2's image encoder side by side (unpatched
# SDPA vs patch_sam dense vs local2d-30), bf16, at batch 1 and 8, eager and compiled; then where batch 8's
# compiled time goes (profile_encoder.py, unpatched vs dense vs local2d-30); with HOST=1 the host cost of its compiled Hiera
# blocks at batch 1 (bench_runtime's compiledhost, about 150 s: then the step limits add up past a device call's
# 600 s, so leave out a batch). About 500 s for hiera_l: one model per call. The first call of a patched model is
# its own command (bench_runtime.py --only firstcall, fresh processes with empty caches of their own). No
# CUDA-graph rows: mode="reduce-overhead" fails inside sam2's own image encoder (docs/benchmarks.md, run 70).
# Every result lands in $OUT as it is measured; each step has its own limit.
# Usage: [HOST=1] [BATCHES="1 8"] bash scripts/device_sam2.sh COMMIT [MODEL, default sam2.1_hiera_l]
set -u
COMMIT=${1:-unknown}
MODEL=${2:-sam2.1_hiera_l}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
for B in ${BATCHES:-1 8}; do
  timeout 200 python3 scripts/side_by_side.py --modes eager,compile --impls sa,dense,local2d-30 --shapes $MODEL:$B \
      --out $OUT/side_sam2.jsonl > $OUT/side_sam2_B$B.log 2>&1
  grep '^{' $OUT/side_sam2_B$B.log | cut -c1-250
done
timeout 170 python3 scripts/profile_encoder.py --models $MODEL --batch 8 --configs unpatched,dense,local2d-30 --top 40 \
    --out $OUT/profile 2>&1 | tail -12
if [ -n "${HOST:-}" ]; then
  timeout 240 python3 scripts/bench_runtime.py --only compiledhost --model $MODEL --sam2-model $MODEL --out $OUT \
      2>&1 | grep '^{' | cut -c1-250
fi
