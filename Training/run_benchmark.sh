#!/usr/bin/env bash
# The real-CT benchmark of docs/evaluation.md ("Results"): every method on (1) the real
# tumour slices of ../shared/data and (2) synthetic tumours (gdpi synth-tumours) in the
# held-out liver of hcc_1720. Run from the repository root with the venv active:
#   RUNS=runs bash Training/run_benchmark.sh
# Steps already done (their output exists) are skipped, so an interrupted run resumes.
set -euo pipefail
RUNS=${RUNS:-runs}
DATA=${DATA:-../shared/data}
PRESET=${PRESET:-fast}
BASELINE_STEPS=${BASELINE_STEPS:-1500}
MODEL=GDPILiverAnomaly/GDPILiverAnomalyLib/models/real_ct_tiny.safetensors
mkdir -p "$RUNS"

# 1. the slice store the bundled real-CT model was trained on (hcc_1720 held out)
[ -d "$RUNS/real_store" ] || gdpi prepare --layout list \
    --input GDPILiverAnomaly/GDPILiverAnomalyLib/models/real_ct_cases.csv \
    --out "$RUNS/real_store" --test-cases hcc_1720 --val-fraction 0 \
    --grid-size 64 --grid-spacing 3.5

# 2. the baselines, on the same healthy training slices
for m in ae vae dae; do
    [ -f "$RUNS/$m/model.safetensors" ] && continue
    gdpi train --model "$m" --data "$RUNS/real_store" --out "$RUNS/$m" \
        --steps "$BASELINE_STEPS" --batch-size 32 --save-every 500 --log-every 100 --no-progress
done

# 3. synthetic tumours in hcc_1720's tumour-free slices (its real tumours -> label 3)
i=0
for v in hu2023 subtle bright small; do
    i=$((i + 1))
    [ -d "$RUNS/synth_cases/hcc_1720-$v" ] || gdpi synth-tumours \
        --ct "$DATA/hcc_1720/ct.nii.gz" --seg "$DATA/hcc_1720/seg.nii.gz" \
        --out "$RUNS/synth_cases/hcc_1720-$v" --variant "$v" --count 4 --seed "$i"
done
[ -d "$RUNS/synth_store" ] || gdpi prepare --layout folders --input "$RUNS/synth_cases" \
    --out "$RUNS/synth_store" --ignore-label 3 --test-cases '*' --val-fraction 0 \
    --grid-size 64 --grid-spacing 3.5

METHODS=(--method gdpi --method gdpi-wrd --method gdpi-wr --method gdpi-wd
    --method gdpi-two-sided --method gdpi-memory-bank
    --method "ae=$RUNS/ae/model.safetensors" --method "vae=$RUNS/vae/model.safetensors"
    --method "dae=$RUNS/dae/model.safetensors" --method darkness)

# 4. real tumours: every abnormal slice (no tumour slice was ever trained on) and the
#    healthy slices of the held-out patient
[ -d "$RUNS/eval_real" ] || gdpi evaluate --data "$RUNS/real_store" --out "$RUNS/eval_real" \
    --checkpoint "$MODEL" --preset "$PRESET" --abnormal-split any --healthy-split test \
    --bank "$RUNS/real_store" --title "Real tumours (../shared/data)" "${METHODS[@]}"

# 5. synthetic tumours (at most 12 abnormal and 12 healthy slices, evenly spread)
[ -d "$RUNS/eval_synth" ] || gdpi evaluate --data "$RUNS/synth_store" --out "$RUNS/eval_synth" \
    --checkpoint "$MODEL" --preset "$PRESET" --max-slices 12 \
    --bank "$RUNS/real_store" --title "Synthetic tumours in hcc_1720" "${METHODS[@]}"
