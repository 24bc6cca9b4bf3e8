#!/usr/bin/env bash
# Patient-level cross-validation of the quality issue (docs/evaluation.md, "Detection quality").
# For each tumour patient (fold) a model that never saw any slice of that patient is
# tested on that patient's slices (real tumours and healthy slices) and on synthetic
# tumours (gdpi synth-tumours, all variants) put into that patient's tumour-free liver.
# Resumable: every step whose output exists is skipped; run it again after a stop.
#
#   bash Training/crossval/run.sh                      (from the repository root, venv active)
#
# Settings (environment):
#   RUNS=runs/cv        where everything goes
#   DATA=../shared/data
#   FOLDS="hcc_1720 hcc_0697 hcc_1211"
#   RECIPES="old tiny"  model recipes; each fold's model is RUNS/models/<recipe>_<fold>/
#                       model.safetensors: taken if present (e.g. unpacked from
#                       Training/gpu_train.sh), else trained here on the CPU:
#                         old:    the previous bundled recipe (tiny, 3500 steps, batch 8,
#                                 basic augmentation, no chaos_ct3)
#                         tiny, medium: every other patient's healthy slices,
#                                 contrast-phase augmentation, batch 32, STEPS steps
#   STEPS=1400          steps of the tiny/medium recipes when trained here
#   PRESET=fast         detection preset of every evaluation
#   MAX_SLICES=12       synthetic tumours: at most N abnormal and N healthy slices per
#                       fold (real tumours: every slice of the patient, so the 3-D
#                       neighbours of every slice are there)
#   METHODS="gdpi-one-sided gdpi-two-sided darkness" (gdpi, the automatic AME side,
#                       equals one of the first two per patient: the summary derives it)
#   EXTRA=""            further gdpi evaluate options (e.g. "--samples 2")
#   TAG=""              suffix of the evaluation folders (for EXTRA variants)
#   VARIANTS="hu2023 subtle bright small"  synthetic tumour variants
# Then: python -m GDPITraining.crossval --runs RUNS (the tables).
set -euo pipefail
RUNS=${RUNS:-runs/cv}
DATA=${DATA:-../shared/data}
FOLDS=${FOLDS:-"hcc_1720 hcc_0697 hcc_1211"}
RECIPES=${RECIPES:-"old tiny"}
STEPS=${STEPS:-1400}
PRESET=${PRESET:-fast}
MAX_SLICES=${MAX_SLICES:-12}
METHODS=${METHODS:-"gdpi-one-sided gdpi-two-sided darkness"}
EXTRA=${EXTRA:-}
TAG=${TAG:-}
VARIANTS=${VARIANTS:-"hu2023 subtle bright small"}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$RUNS"

# 1. one store of every case's slices (the case list names ../shared/data relative to it)
CASES="$HERE/cases.csv"
if [ "$DATA" != ../shared/data ]; then
    CASES="$RUNS/cases.csv"
    sed "s#\.\./\.\./\.\./shared/data#$(cd "$DATA" && pwd)#g" "$HERE/cases.csv" >"$CASES"
fi
[ -d "$RUNS/store" ] || gdpi prepare --layout list --input "$CASES" --out "$RUNS/store" \
    --val-fraction 0 --grid-size 64 --grid-spacing 3.5

# 2. synthetic tumours in each fold patient's liver (its real tumours -> label 3, left out)
i=0
for f in $FOLDS; do
    for v in $VARIANTS; do
        i=$((i + 1))
        [ -d "$RUNS/synth_cases/$f-$v" ] || gdpi synth-tumours --ct "$DATA/$f/ct.nii.gz" \
            --seg "$DATA/$f/seg.nii.gz" --out "$RUNS/synth_cases/$f-$v" --variant "$v" \
            --count 4 --seed "$i"
    done
done
[ -d "$RUNS/synth_store" ] || gdpi prepare --layout folders --input "$RUNS/synth_cases" \
    --out "$RUNS/synth_store" --ignore-label 3 --test-cases '*' --val-fraction 0 \
    --grid-size 64 --grid-spacing 3.5

# 3. a model per recipe and fold (never trained on the fold's patient)
for r in $RECIPES; do
    for f in $FOLDS; do
        m="$RUNS/models/${r}_$f"
        [ -f "$m/model.safetensors" ] && [ ! -f "$m/state.pt" -o -f "$m/done" ] && continue
        case $r in
        old) gdpi train --data "$RUNS/store" --out "$m" --size tiny --steps 3500 --batch-size 8 \
            --lr 2e-4 --save-every 500 --exclude-cases "$f,chaos_ct3" --no-progress ;;
        *) gdpi train --data "$RUNS/store" --out "$m" --size "$r" --steps "$STEPS" \
            --batch-size 32 --lr 2e-4 --augment-phase --save-every 200 --exclude-cases "$f" \
            --no-progress ;;
        esac
        touch "$m/done"
    done
done

# 4. evaluate each fold's model on that fold's patient only
for r in $RECIPES; do
    for f in $FOLDS; do
        m="$RUNS/models/${r}_$f/model.safetensors"
        args=(--checkpoint "$m" --preset "$PRESET" --panels 2)
        for x in $METHODS; do args+=(--method "$x"); done
        out="$RUNS/eval/${r}${TAG}/$f"
        synth=$(for v in $VARIANTS; do printf "%s," "$f-$v"; done)
        [ -d "$out/real" ] || gdpi evaluate --data "$RUNS/store" --out "$out/real" \
            --cases "$f" --abnormal-split any --healthy-split any "${args[@]}" $EXTRA \
            --title "$r$TAG, fold $f: real" >/dev/null
        [ -d "$out/synth" ] || gdpi evaluate --data "$RUNS/synth_store" --out "$out/synth" \
            --cases "${synth%,}" --max-slices "$MAX_SLICES" "${args[@]}" $EXTRA --title "$r$TAG, fold $f: synthetic" \
            >/dev/null
        echo "evaluated $r$TAG fold $f"
    done
done
