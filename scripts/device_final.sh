#!/usr/bin/env bash
# A session's last device call: the README's test command on the GPU machine (with pytest-xdist's -n 16,
# which that machine has, so that it fits one call), then SAM 2's hiera_l encoder rows. Results in $OUT.
# Usage: bash scripts/device_final.sh COMMIT
set -u
COMMIT=${1:-unknown}
. scripts/device_setup.sh
export SAM_SPARSE_COMMIT=$COMMIT
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/pip_editable.log 2>&1 \
    || echo "editable install failed: the console-script test will say so"
timeout 440 python3 -m pytest -q -n 16 -p no:cacheprovider -rs --durations=20 2>&1 | tee $OUT/readme_tests.log \
    | grep -v "Warning\|warnings.warn" | tail -30
timeout 100 python3 scripts/side_by_side.py --modes eager --impls sa,dense,local2d-30 \
    --shapes sam2.1_hiera_l:1,sam2.1_hiera_l:8 --out $OUT/side_sam2.jsonl 2>&1 | grep '^{' | cut -c1-200
