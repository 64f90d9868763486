#!/usr/bin/env bash
# A session's test call on the lent GPU machine: the README's test command (pytest-xdist's -n auto --dist
# loadfile; conftest gives each worker its share of the cores), then in the
# time left the kernel's memory-attention and SAM sections of bench_kernel.py (BENCH=kernel, the default),
# bench_amg's sections (BENCH=amg; AMG: the sections, default amg; AMG_S seconds) or nothing (BENCH=). Results in $OUT.
# Usage: bash scripts/device_final.sh COMMIT [TEST_SECONDS, default 400]   (env WORKERS: pytest-xdist workers, default auto)
set -u
COMMIT=${1:-unknown}
TEST_S=${2:-400}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 \
    || echo "editable install failed: the console-script test will say so"
start=$(date +%s)
timeout $TEST_S python3 -m pytest -n ${WORKERS:-auto} --dist loadfile -v -p no:cacheprovider -rfE --durations=15 2>&1 \
    | grep -v "Warning\|warner(\|warnings.warn" > $OUT/readme_tests.log
echo "test command: $(( $(date +%s) - start )) s"
grep -E "^(FAILED|ERROR)|\] (FAILED|ERROR)" $OUT/readme_tests.log | head -20
tail -4 $OUT/readme_tests.log
if [ "${BENCH-kernel}" = kernel ]; then
  timeout 150 python3 scripts/bench_kernel.py --section memory --out $OUT/bench_memory.md --commit $COMMIT 2>&1 | tail -30
  timeout 90 python3 scripts/bench_kernel.py --section sam --no-flex --models vit_b --batches 1,8 --densities 1.0,0.25 \
      --out $OUT/bench_sam.md --commit $COMMIT 2>&1 | grep -v '^{' | tail -12
elif [ "${BENCH}" = amg ]; then
  timeout ${AMG_S:-100} python3 scripts/bench_amg.py --out "$OUT" --only ${AMG:-amg} --mobile-sam-checkpoint .whl/cache/mobile_sam.pt \
      2>&1 | grep '^{' | cut -c1-400
fi
