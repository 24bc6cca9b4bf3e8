#!/usr/bin/env bash
# Rebuilds the bundled demo model (GDPILiverAnomaly/GDPILiverAnomalyLib/models/demo.safetensors).
# Healthy synthetic abdomens only (seeds 1000..1079); the demo case (seed 7) is not among them.
# Training resumes if interrupted: run the same command again.
set -euo pipefail
RUNS=${RUNS:-runs}
STEPS=${STEPS:-3000}
gdpi prepare --layout synthetic --synthetic-cases 80 --seed 1000 --val-fraction 0.05 \
    --grid-size 64 --grid-spacing 3.5 --out "$RUNS/demo_store"
gdpi train --data "$RUNS/demo_store" --out "$RUNS/demo_run" --size tiny --steps "$STEPS" \
    --batch-size 8 --lr 2e-4 --save-every 250 --log-every 50
cp "$RUNS/demo_run/model.safetensors" GDPILiverAnomaly/GDPILiverAnomalyLib/models/demo.safetensors
