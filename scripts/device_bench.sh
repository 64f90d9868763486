#!/usr/bin/env bash
# One device call: kernel benchmark for vit_h, end-to-end encoder benchmark eager (vit_b, vit_h at
# batch 1 and 8) and compiled (vit_b batch 8). Results land in $OUT. Needs segment-anything's wheel
# in .whl/ (the device image lacks it). Usage: bash scripts/device_bench.sh COMMIT
set -u
COMMIT=${1:-unknown}
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 SAM_SPARSE_COMMIT=$COMMIT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 170 python3 scripts/bench_kernel.py --models vit_h --out $OUT/bench_vith.md --commit $COMMIT 2>&1 | grep -v '^{' | tail -12
timeout 230 python3 scripts/bench_e2e.py --models vit_b,vit_h --batches 1,8 --no-compile --rep 200 --out $OUT/e2e_eager.json 2>&1 | tail -40
timeout 180 python3 scripts/bench_e2e.py --models vit_b --batches 8 --policies dense,local2d-15 --no-predictor --rep 200 --out $OUT/e2e_compile.json 2>&1 | tail -14
