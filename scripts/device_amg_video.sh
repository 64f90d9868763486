#!/usr/bin/env bash
# A session's benchmark call on the lent GPU machine: bench_amg.py (issue 24: MobileSAM's released weights,
# carried in .whl/cache) and bench_video.py (issue 23) at hiera_l. Results in $OUT as each row completes.
# Usage: bash scripts/device_amg_video.sh COMMIT [AMG sections, default amg,breakdown,predictor,vit]
set -u
COMMIT=${1:-unknown}
SECTIONS=${2:-amg,breakdown,predictor,vit}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
timeout 260 python3 scripts/bench_amg.py --out $OUT --only $SECTIONS \
    --mobile-sam-checkpoint .whl/cache/mobile_sam.pt 2>&1 | grep -v Warning | tail -40
timeout 200 python3 scripts/bench_video.py --models sam2.1_hiera_l --objects 1,16 --out $OUT 2>&1 | tail -30
