#!/usr/bin/env bash
# One device call for SAM 2 images (issue 22): the GPU test suite, then sam2's image encoder side by side
# (unpatched SDPA vs patch_sam dense vs local2d-30; hiera_b+ and hiera_l at batch 1 and 8, bf16, eager;
# compiled at batch 8 for the models in COMPILE), where the time goes (profiler, eager), SAM2ImagePredictor
# on a 1500 x 2250 photo, and the first call of a patched model in a fresh process. Every result lands in
# $OUT as it is measured. Usage: bash scripts/device_sam2.sh COMMIT [COMPILE models, default b+]
set -u
COMMIT=${1:-unknown}
COMPILE=${2:-sam2.1_hiera_b+}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -m gpu tests/gpu -n 8 -p no:cacheprovider 2>&1 \
    | tee $OUT/gpu_tests.log | grep -v Warning | tail -6
timeout 170 python3 scripts/side_by_side.py --modes eager --impls sa,dense,local2d-30 \
    --shapes sam2.1_hiera_b+:1,sam2.1_hiera_b+:8,sam2.1_hiera_l:1,sam2.1_hiera_l:8 --out $OUT/side_sam2.jsonl \
    2>&1 | grep '^{' | cut -c1-200
for m in ${COMPILE//,/ }; do
  timeout 200 python3 scripts/side_by_side.py --modes compile --impls sa,dense,local2d-30 --shapes $m:8 \
      --out $OUT/side_sam2.jsonl 2>&1 | grep '^{' | cut -c1-200
done
timeout 80 python3 scripts/profile_encoder.py --models sam2.1_hiera_b+,sam2.1_hiera_l --batch 8 --mode eager \
    --iters 5 --out $OUT/profile > /dev/null 2>&1; head -8 $OUT/profile/profile_encoder.md
timeout 120 python3 scripts/bench_runtime.py --only sam2predictor,firstcall --model sam2.1_hiera_l \
    --sam2-model sam2.1_hiera_b+ --out $OUT 2>&1 | grep '^{' | cut -c1-250
