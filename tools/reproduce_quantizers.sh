#!/usr/bin/env bash
# Dev accuracy of every --quantizer (docs/quantizers.md), as edgeq sweep grids; replaces tools/quantizer_table.py.
#
#   tools/reproduce_quantizers.sh
#
# Per task: SVD saliency (rank 8), k = 0 and 256, quantizers rtn, gptq, sarqc-gbs, sarqc-gs, lsi (default
# hyper-parameters), block 32 and (suffix -per-channel) per-channel; calibration = 128 examples of the task's
# train split, seed 1 (last quarter held out).  Cell ids: svd-k256-gptq, int4-k0-lsi-per-channel, ...; each
# calibrated cell records quantize_seconds (wall), quantize_cpu_seconds and the quantizer report (λ / best
# epoch per layer), and every cell its plan parity (ONNX Runtime vs PyTorch carrying the planned Ŵ).
# Resumable; run from the repository root; run the tasks in parallel only on a quiet machine.
# results/quantizers/{RTE,MRPC,SST-2}.jsonl and table.md were made by the retired tools/quantizer_table.py.
# Environment: TASKS, THREADS, SHARED.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
TASKS=${TASKS:-"RTE MRPC SST-2"}
THREADS=${THREADS:-1}
declare -A MODEL=([RTE]=minilm-l6-rte [MRPC]=minilm-l6-mrpc [SST-2]=minilm-l6-sst2)
declare -A CALIB=([RTE]=rte [MRPC]=mrpc [SST-2]=sst-2)

for task in $TASKS; do
  name=$(echo "$task" | tr 'A-Z' 'a-z' | tr -d '-')
  echo "== $task -> results/quantizers/$name" >&2
  edgeq sweep "$SHARED/models/${MODEL[$task]}" --task "$task" --methods svd --k 0,256 \
    --quantizers rtn,gptq,sarqc-gbs,sarqc-gs,lsi --block-size 32,per-channel \
    --calib "${CALIB[$task]}" --calib-samples 128 --seed 1 --data-dir "$SHARED/data/glue" \
    --threads "$THREADS" --out "results/quantizers/$name" > /dev/null
done
