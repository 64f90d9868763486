#!/usr/bin/env bash
# A session's measurement call on the lent GPU machine, each step cut by its own time limit so a slow one
# cannot take the others' results: the GPU tests of what changed, bench_amg sections (MobileSAM's weights
# carried in .whl/cache) and bench_video per model.
# Usage: bash scripts/device_session.sh COMMIT
#   env: TESTS (pytest files), TESTS_S (their time limit, s), AMG (bench_amg sections), AMG_S (their time limit, s), VIDEO ("model:objects ..."
#   pairs; empty: none), CONFIGS (video configs), VARIANTS (bench_amg --variants, when set)
set -u
COMMIT=${1:-unknown}
TESTS=${TESTS:-tests/gpu/test_gpu_upscale.py tests/gpu/test_gpu_graphs.py tests/gpu/test_gpu_maskgen.py}
AMG=${AMG:-variants,crops,profile}
AMG_S=${AMG_S:-360}
TESTS_S=${TESTS_S:-240}
VIDEO=${VIDEO-sam2.1_hiera_l:1,16}
CONFIGS=${CONFIGS:-unpatched,dense-batched,memory-local}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
TRITON_INTERPRET=0 timeout $TESTS_S python3 -m pytest -m gpu -v -rfE -p no:cacheprovider $TESTS > "$OUT/gpu_tests.log" 2>&1
grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -3
timeout $AMG_S python3 scripts/bench_amg.py --out "$OUT" --only $AMG ${VARIANTS:+--variants "$VARIANTS"} \
    --mobile-sam-checkpoint .whl/cache/mobile_sam.pt 2>&1 | grep -v Warning | grep '^{' | cut -c1-400
for spec in $VIDEO; do
  timeout 170 python3 scripts/bench_video.py --models ${spec%%:*} --objects ${spec##*:} --configs $CONFIGS \
      --out "$OUT"/video_$(echo ${spec%%:*} | tr + p) 2>&1 | grep '^|' | tail -12
done
