#!/usr/bin/env bash
# Trains the cross-validation and shipped models of the quality issue on one GPU, all
# runs at once (small networks leave a big GPU mostly idle, so runs share it well):
#   - old_<fold>:  the previous bundled recipe (tiny, 3500 steps, batch 8, lr 2e-4, basic
#                  augmentation, the four scans it had: no chaos_ct3), without <fold>
#   - tiny_<fold>, medium_<fold>: every healthy slice except <fold>'s, contrast-phase
#                  augmentation, batch 32, lr 2e-4, for MINUTES of training each
#   - tiny_all: every healthy slice (the shipped model's recipe)
# Weights are float16 (<= 16 MiB per file); EMA snapshots every 2000 steps give the
# validation curves (GDPITraining.curves: loss on the held-out patient's healthy slices).
# Needs only torch, numpy, scipy, safetensors (no SimpleITK): the store is made beforehand
# by `gdpi prepare` (Training/crossval/run.sh step 1).
#   bash Training/gpu_train.sh STORE OUT [MINUTES]        (MINUTES default 6)
# Smoke mode on a CPU: SMOKE=1 bash Training/gpu_train.sh STORE OUT
set -uo pipefail
STORE=$1
OUT=$2
MINUTES=${3:-6}
FOLDS=(hcc_1720 hcc_0697 hcc_1211)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/GDPILiverAnomaly:$ROOT/Training${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OLD_STEPS=3500
NEW_STEPS=200000
SNAP=2000
SIZES=(tiny medium)
CURVE_SLICES=0
if [ "${SMOKE:-0}" = 1 ]; then
    OLD_STEPS=4 NEW_STEPS=4 SNAP=2 MINUTES=1 SIZES=(tiny) CURVE_SLICES=2
    export OMP_NUM_THREADS=1
fi
mkdir -p "$OUT"
pids=()
run() {  # name, then gdpi train options
    local name=$1
    shift
    "$PY" -m GDPITraining train --data "$STORE" --out "$OUT/$name" --no-progress \
        --log-every 100 "$@" >"$OUT/$name.log" 2>&1 &
    pids+=($!)
}
for f in "${FOLDS[@]}"; do
    run "old_$f" --size tiny --steps "$OLD_STEPS" --batch-size 8 --lr 2e-4 \
        --save-every "$OLD_STEPS" --exclude-cases "$f,chaos_ct3" --weights-dtype float16
done
for size in "${SIZES[@]}"; do
    for f in "${FOLDS[@]}" all; do
        [ "$size" != tiny ] && [ "$f" = all ] && continue  # only tiny is shipped (CPU speed)
        exclude=$f
        [ "$f" = all ] && exclude=
        run "${size}_$f" --size "$size" --steps "$NEW_STEPS" --batch-size 32 --lr 2e-4 \
            --augment-phase --max-minutes "$MINUTES" --save-every "$SNAP" \
            --snapshot-every "$SNAP" --weights-dtype float16 --exclude-cases "$exclude"
    done
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
# validation curves: each fold run's snapshots on its held-out patient's healthy slices
for size in "${SIZES[@]}"; do
    for f in "${FOLDS[@]}"; do
        "$PY" -m GDPITraining.curves --data "$STORE" --run "$OUT/${size}_$f" --cases "$f" \
            --max-slices "$CURVE_SLICES" --out "$OUT/curve_${size}_$f.json" >"$OUT/curve_${size}_$f.log" 2>&1 ||
            failed=$((failed + 1))
    done
done
for log in "$OUT"/*.log; do echo "== $log"; tail -n 3 "$log"; done
echo "$failed run(s) failed"
exit "$failed"
