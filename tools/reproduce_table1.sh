#!/usr/bin/env bash
# Table I / Figure 1 of the SVD-saliency paper, reproduced on the MiniLM-L6 GLUE models in ../shared.
#
#   tools/reproduce_table1.sh [GRANULARITY ...]     # default: 32 per-channel per-tensor
#
# Every sweep is resumable (finished cells live in results/table1/<task>-<granularity>/cells/);
# rerunning skips them. Run from the repository root. One thread each: the machine is shared.
# Environment: METHODS (default svd,awq,spqr,magnitude,random), KS, TASKS, THREADS, SHARED.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
METHODS=${METHODS:-svd,awq,spqr,magnitude,random}
KS=${KS:-0,1,16,64,256,1024,4096}
TASKS=${TASKS:-"RTE MRPC SST-2"}
THREADS=${THREADS:-1}
GRANULARITIES=("$@")
[ ${#GRANULARITIES[@]} -eq 0 ] && GRANULARITIES=(32 per-channel per-tensor)

declare -A MODEL=([RTE]=minilm-l6-rte [MRPC]=minilm-l6-mrpc [SST-2]=minilm-l6-sst2)
declare -A CALIB=([RTE]=rte [MRPC]=mrpc [SST-2]=sst-2)

for gran in "${GRANULARITIES[@]}"; do
  for task in $TASKS; do
    name=$(echo "$task" | tr 'A-Z' 'a-z' | tr -d '-')
    tag=$([ "$gran" = 32 ] && echo b32 || echo "$gran")
    out=results/table1/${name}-${tag}
    echo "== $task, granularity $gran -> $out" >&2
    edgeq sweep "$SHARED/models/${MODEL[$task]}" --task "$task" \
      --methods "$METHODS" --k "$KS" --block-size "$gran" \
      --calib "${CALIB[$task]}" --calib-samples 128 --seed 0 \
      --data-dir "$SHARED/data/glue" --threads "$THREADS" --out "$out" > /dev/null
  done
done
