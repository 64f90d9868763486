#!/usr/bin/env bash
# A session's profiling call on the lent GPU machine: where the time goes in mask generation (bench_amg.py
# --only profile, and the compiled decoder), in SAM 2 video frames (bench_video.py --profile) and in the
# compiled Hiera encoder (profile_encoder.py). Results in $OUT as each step completes.
# Usage: bash scripts/device_profile.sh COMMIT
set -u
COMMIT=${1:-unknown}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
timeout 170 python3 scripts/bench_amg.py --out "$OUT" --only profile,compile --breakdown-images 3 \
    --mobile-sam-checkpoint .whl/cache/mobile_sam.pt 2>&1 | grep -v Warning | tail -30
timeout 170 python3 scripts/bench_video.py --models sam2.1_hiera_l --objects 1,16 --configs unpatched,dense-batched \
    --profile --out "$OUT/video" 2>&1 | tail -30
timeout 150 python3 scripts/profile_encoder.py --models sam2.1_hiera_b+ --batch 8 --mode default --iters 5 \
    --out "$OUT/profile" 2>&1 | tail -40
