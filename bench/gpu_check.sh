#!/usr/bin/env bash
# The GPU check (issue 23, section 3): one command, under 8 minutes, on a machine with one
# H100/H200, PyTorch and no network; every figure in one go, in OUT (JSON, logs and
# summary.md, each well under 16 MiB):
#   0. SimpleITK (and any other wheel) from the carried kit, into a private folder
#   1. the CUDA tests (Testing/test_cuda.py, test_devices.py; generated data, no ../shared)
#   2. the network per model size (tiny, medium, small), batch 1-64, float32/bf16, eager
#   3. the presets end to end on a generated CT with liver on 100 slices (gdpi detect
#      child processes): fast at the default GPU batch, fast and paper at batch 64
#   4. the network compiled (torch.compile, CUDA graphs) for tiny at batch 8 and 64
#   5. cross-case packing (Ray engine, one GPU worker) against per-case batching (local),
#      when Ray and ../shared/data are there (Ray's wheel does not fit the 64 MiB carry)
# Steps share a budget (BUDGET_S, default 450 s): each gets at most what is left, so the
# whole command ends inside 8 minutes even when a step hangs.
#
#   here, once:   bash bench/gpu_kit.sh                 # SimpleITK wheel -> bench/gpu_kit/
#   on the GPU:   bash bench/gpu_check.sh "$OUT"        # device tool: carry ["bench/gpu_kit"]
#   smoke (CPU):  SMOKE=1 bash bench/gpu_check.sh OUT   # every step, micro sizes, on a CPU
#                 (2-4 minutes on a 2-core CPU: not in the default test suite; see
#                 docs/performance.md#gpu)
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIT=${GPU_KIT:-$ROOT/bench/gpu_kit}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then SCALE=4; else SCALE=1; fi  # a loaded CPU is slow: smoke waits longer
BUDGET=${BUDGET_S:-$((450 * SCALE))}
export PYTHONPATH="$ROOT/GDPILiverAnomaly:$ROOT/Training${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: >"$OUT/steps.tsv"
failed=0
step() {  # NAME LIMIT_S COMMAND...: run within the budget, log to OUT/NAME.log
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt 10 ]; then
        echo "== $name: skipped, the ${BUDGET} s budget is spent" | tee "$OUT/$name.log"
        printf '%s\tskipped\t0\n' "$name" >>"$OUT/steps.tsv"
        failed=$((failed + 1))
        return
    fi
    limit=$((limit * SCALE))
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (at most $limit s)"
    t0=$SECONDS
    timeout -k 5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$OUT/steps.tsv"
    if [ "$rc" -ne 0 ]; then
        failed=$((failed + 1))
        echo "   failed (exit $rc$([ "$rc" -eq 124 ] && echo ', out of time'))"
    fi
    tail -n 3 "$OUT/$name.log"
}

# 0. wheels from the kit, into a private folder ahead of everything else on the path
if compgen -G "$KIT/wheels/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target "$SITE" "$KIT"/wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi
step versions 60 "$PY" -c "
import platform, sys, torch, numpy, scipy, SimpleITK
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA GPU'
print(f'{gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); Python '
      f'{platform.python_version()}; numpy {numpy.__version__}; scipy {scipy.__version__}; '
      f'SimpleITK {SimpleITK.Version_VersionString()}; {platform.machine()}')"
cp "$OUT/versions.log" "$OUT/versions.txt" 2>/dev/null

# 1. the CUDA tests (they skip without a GPU)
step cuda_tests 120 "$PY" -m pytest -q -p no:cacheprovider "$ROOT/Testing/test_cuda.py" \
    "$ROOT/Testing/test_devices.py"

if [ "$SMOKE" = 1 ]; then  # the same steps, micro-sized, on the CPU
    gpu=(--smoke)
    detect_default=(--cases synthetic_100 --synthetic-slices 6 --smoke)
    detect_b64=(--cases synthetic_100 --synthetic-slices 6 --smoke --presets fast paper
        --detect-args "--batch-size 4")
    compiled=(--smoke --sizes micro --batches 2 --compile-sizes micro --compile-batches 2
        --compiled-only)
    ray=(--smoke)
else
    gpu=(--sizes tiny medium small --batches 1 8 32 64 --compile-sizes)
    detect_default=(--cases synthetic_100 --presets fast)
    detect_b64=(--cases synthetic_100 --presets fast paper --detect-args "--batch-size 64")
    compiled=(--sizes tiny --batches 8 64 --compile-sizes tiny --compile-batches 8 64 --compiled-only)
    ray=(--copies 2 --device cuda --detect-args "--batch-size 64" --ray-args "--gpus-per-worker 1")
fi
# 2. the network per model size, eager
step network 90 "$PY" "$ROOT/bench/bench_gpu.py" "${gpu[@]}" --json "$OUT/network.json"
# 3. the presets end to end (generated 100-liver-slice CT, gdpi detect child processes)
step presets_default 90 "$PY" "$ROOT/bench/bench_detect.py" "${detect_default[@]}" \
    --json "$OUT/presets_default.json"
step presets_b64 150 "$PY" "$ROOT/bench/bench_detect.py" "${detect_b64[@]}" \
    --json "$OUT/presets_b64.json"
# 4. the network compiled
step compiled 90 "$PY" "$ROOT/bench/bench_gpu.py" "${compiled[@]}" --json "$OUT/compiled.json"
# 5. cross-case packing on Ray
if ! "$PY" -c "import ray" 2>/dev/null; then
    echo "== packing: skipped, Ray is not installed here" | tee "$OUT/packing.log"
elif [ ! -d "$ROOT/../shared/data" ]; then
    echo "== packing: skipped, no ../shared/data beside the repository" | tee "$OUT/packing.log"
else
    step packing 90 "$PY" "$ROOT/bench/bench_ray.py" "${ray[@]}" --json "$OUT/packing.json"
fi

# every table in one file, and on stdout (the device tool returns the output's tail)
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ), SMOKE=$SMOKE, $SECONDS s"
    cat "$OUT/versions.txt" 2>/dev/null
    printf '\nstep\texit\tseconds\n'
    cat "$OUT/steps.tsv"
    for name in cuda_tests network presets_default presets_b64 compiled packing; do
        [ -f "$OUT/$name.log" ] || continue
        echo
        echo "## $name"
        grep -E '( \| |^\||^#|[0-9]+ (passed|failed|skipped))' "$OUT/$name.log" | tail -n 60
    done
} >"$OUT/summary.md"
cat "$OUT/summary.md"
echo "$failed step(s) failed"
exit "$failed"
