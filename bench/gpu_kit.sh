#!/usr/bin/env bash
# Make bench/gpu_kit/ (git-ignored): what bench/gpu_check.sh needs on a GPU machine with no
# network beyond its own PyTorch image. That image (nvidia-h100-x1 / nvidia-h200: Python
# 3.12, torch, numpy, scipy, safetensors, tqdm, matplotlib, scikit-learn, pytest,
# hypothesis) lacks SimpleITK alone, so the kit is SimpleITK's wheel (abi3, ~50 MiB) for
# that Python. The repository's tracked files plus the kit must stay within the device
# tool's 64 MiB: this script prints the total and fails above it.
#
#   bash bench/gpu_kit.sh [--python-version 3.12]      # then, on the GPU machine:
#   bash bench/gpu_check.sh "$OUT"                      # device tool: carry ["bench/gpu_kit"]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
KIT=${GPU_KIT:-$ROOT/bench/gpu_kit}
PYVER=3.12
if [ "${1:-}" = "--python-version" ]; then PYVER=$2; fi
PY=${PYTHON:-python3}
mkdir -p "$KIT/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --dest "$KIT/wheels" "SimpleITK>=2.2" 2>&1 |
    grep -v "^WARNING: Location" || true
ls "$KIT"/wheels/*.whl >/dev/null  # fails here if nothing was downloaded
# what travels: tracked + untracked-not-ignored files, and the kit
tree=$(cd "$ROOT" && { git ls-files -z; git ls-files -z -o --exclude-standard; } |
    xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
kit=$(du -sb "$KIT" | cut -f1)
total=$((tree + kit))
awk -v k="$kit" -v t="$tree" -v d="$KIT" 'BEGIN {m = 1048576;
    printf "kit %s: %.1f MiB; working tree %.1f MiB; together %.1f MiB of 64\n", d, k/m, t/m, (k+t)/m}'
if [ "$total" -gt $((64 * 1048576)) ]; then
    echo "gpu_kit: over the device tool's 64 MiB: the call would be refused" >&2
    exit 1
fi
