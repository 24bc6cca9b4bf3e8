#!/usr/bin/env bash
# One GPU run (a few minutes on an H100/H200): the paper preset on the cross-validation
# folds (real and synthetic tumours; the fast preset's figures come from the CPU runs),
# then the network timings. Needs only torch, numpy, scipy, safetensors, scikit-learn.
#   bash bench/gpu_check.sh OUT            (stores and fold models as below)
# Smoke mode on a CPU: SMOKE=1 bash bench/gpu_check.sh OUT
set -uo pipefail
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/GDPILiverAnomaly:$ROOT/Training${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RUNS=${RUNS:-runs/cv_s2}
MODELS=${MODELS:-runs/gpu}
PRESET_ARGS=(--preset paper)
BENCH=()
if [ "${SMOKE:-0}" = 1 ]; then
    PRESET_ARGS=(--preset paper --steps 4 --jump-length 1 --jump-n-sample 1) BENCH=(--smoke)
fi
mkdir -p "$OUT"
failed=0
for f in hcc_1720 hcc_0697 hcc_1211; do
    side=gdpi-one-sided
    [ "$f" = hcc_1211 ] && side=gdpi-two-sided   # what the automatic AME side picks
    common=(--checkpoint "$MODELS/tiny_$f/model.safetensors" "${PRESET_ARGS[@]}" --method "$side"
        --ame-sigma-mm 2 --offset-hu 10 --depth-sigma-mm 0 --batch-size 64 --panels 0)
    "$PY" -m GDPITraining evaluate --data "$RUNS/store" --cases "$f" --abnormal-split any \
        --healthy-split any --out "$OUT/eval/tiny_off10_paper/$f/real" "${common[@]}" \
        >"$OUT/eval_$f.log" 2>&1 || failed=$((failed + 1))
    synth=$(for v in hu2023 subtle bright small; do printf "%s," "$f-$v"; done)
    "$PY" -m GDPITraining evaluate --data "$RUNS/synth_store" --cases "${synth%,}" \
        --max-slices 12 --out "$OUT/eval/tiny_off10_paper/$f/synth" "${common[@]}" \
        >>"$OUT/eval_$f.log" 2>&1 || failed=$((failed + 1))
    tail -n 2 "$OUT/eval_$f.log"
done
tar cf "$OUT/eval.tar" -C "$OUT" eval && rm -rf "$OUT/eval"   # 2 folder levels come back
timeout "${BENCH_SECONDS:-100}" "$PY" "$ROOT/bench/bench_gpu.py" "${BENCH[@]}" \
    --json "$OUT/bench_gpu.json" || failed=$((failed + 1))
echo "$failed step(s) failed"
exit "$failed"
