#!/usr/bin/env bash
# The GPU check of the speed issue, in one run of at most 8 minutes on an H100/H200
# machine (no internet there): install what is missing from carried wheels, run the
# CUDA tests, time the network per model size (batch 1-64, float32/bf16, eager,
# torch.compile and CUDA graphs, peak GPU memory), run the presets end to end on a
# real case, and compare cross-case packing (Ray engine) with per-case batching.
# Everything lands in OUT (JSON and logs, each well under 16 MiB).
#
#   here, once:   pip download --only-binary :all: --no-deps --dest wheels \
#                     --python-version 3.11 --platform manylinux2014_x86_64 SimpleITK \
#                     pytest hypothesis iniconfig pluggy packaging sortedcontainers attrs
#   on the GPU:   bash bench/gpu_check.sh OUT      (carry: wheels)
#   smoke (CPU):  SMOKE=1 bash bench/gpu_check.sh OUT
set -uo pipefail
OUT=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/GDPILiverAnomaly:$ROOT/Training${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
failed=0
step() {  # NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 || { failed=$((failed + 1)); echo "   failed"; }
    tail -n 3 "$OUT/$name.log"
}
# 1. what the engine needs beyond torch/numpy/scipy (the GPU image may lack SimpleITK)
if [ -d "$ROOT/wheels" ]; then
    step install 120 "$PY" -m pip install --no-index --find-links "$ROOT/wheels" SimpleITK \
        safetensors pytest hypothesis tqdm
fi
"$PY" -c "import torch, sys; print(torch.__version__, torch.cuda.is_available(), sys.version)" \
    | tee "$OUT/versions.txt"
if [ "${SMOKE:-0}" = 1 ]; then
    step bench_gpu 300 "$PY" "$ROOT/bench/bench_gpu.py" --smoke --json "$OUT/bench_gpu.json"
    step presets 300 "$PY" "$ROOT/bench/bench_detect.py" --smoke --json "$OUT/presets.json"
    if "$PY" -c "import ray" 2>/dev/null; then
        step packing 300 "$PY" "$ROOT/bench/bench_ray.py" --smoke --json "$OUT/packing.json"
    fi
else
    # 2. the CUDA tests (they skip on machines without a GPU)
    step cuda_tests 120 "$PY" -m pytest -q "$ROOT/Testing/test_cuda.py"
    # 3. the presets end to end on a real case (gdpi detect child processes)
    step presets 150 "$PY" "$ROOT/bench/bench_detect.py" --cases hcc_1720 hcc_1211 --full \
        --json "$OUT/presets.json"
    # 4. the network per size, batch, precision and compilation
    step bench_gpu 200 "$PY" "$ROOT/bench/bench_gpu.py" --json "$OUT/bench_gpu.json"
    # 5. cross-case packing (Ray engine, one GPU worker) vs per-case batching (local), when
    #    the GPU image has Ray (its wheel, ~70 MB, does not fit the 64 MiB carry)
    if "$PY" -c "import ray" 2>/dev/null; then
        step packing 200 "$PY" "$ROOT/bench/bench_ray.py" --copies 2 --device cuda \
            --detect-args "--batch-size 64" --ray-args "--gpus-per-worker 1" \
            --json "$OUT/packing.json"
    else
        echo "== packing: skipped, Ray is not installed on this machine" | tee "$OUT/packing.log"
    fi
fi
echo "$failed step(s) failed"
exit "$failed"
