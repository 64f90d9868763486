#!/usr/bin/env bash
# A session's measurement call on the lent GPU machine, each step cut by its own time limit so a slow one
# cannot take the others' results: the GPU tests of what changed, bench_amg's fast-mode variants and
# predictor rows (MobileSAM's weights carried in .whl/cache), and bench_video at hiera_l.
# Usage: bash scripts/device_session.sh COMMIT [pytest files] [video objects]
set -u
COMMIT=${1:-unknown}
TESTS=${2:-tests/gpu/test_gpu_graphs.py tests/gpu/test_gpu_maskgen.py}
OBJECTS=${3:-1,16}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
TRITON_INTERPRET=0 timeout 150 python3 -m pytest -m gpu -v -rfE -p no:cacheprovider $TESTS > $OUT/gpu_tests.log 2>&1
tail -15 $OUT/gpu_tests.log
timeout 230 python3 scripts/bench_amg.py --out $OUT --only variants,predictor \
    --mobile-sam-checkpoint .whl/cache/mobile_sam.pt 2>&1 | grep -v Warning | tail -25
timeout 170 python3 scripts/bench_video.py --models sam2.1_hiera_l --objects $OBJECTS \
    --configs unpatched,dense-batched,memory-local --out $OUT/video 2>&1 | tail -12
