#!/usr/bin/env bash
# Packs the runs of Training/gpu_train.sh into tar files of at most 16 MiB each (the
# device machine returns at most 8 files): bash Training/gpu_pack.sh RUNS DEST
set -euo pipefail
RUNS=$1
DEST=$2
mkdir -p "$DEST"
cd "$RUNS"
keep() { for r in "$@"; do [ -d "$r" ] && echo "$r/model.safetensors $r/log.csv"; done; }
tar cf "$DEST/a_old_tiny.tar" $(keep old_hcc_1720 old_hcc_0697 old_hcc_1211 tiny_hcc_1720 tiny_hcc_0697)
tar cf "$DEST/b_tiny_logs.tar" $(keep tiny_hcc_1211 tiny_all medium_hcc_1720 medium_hcc_0697 medium_hcc_1211 | sed 's/[^ ]*model.safetensors//g; s/^/ /') \
    tiny_hcc_1211/model.safetensors tiny_all/model.safetensors ./*.log ./*.json
for f in hcc_1720 hcc_0697 hcc_1211; do
    [ -f "medium_$f/model.safetensors" ] && tar cf "$DEST/c_medium_$f.tar" "medium_$f/model.safetensors"
done
ls -la "$DEST"
