#!/usr/bin/env bash
# Fidelity to FP32 vs k (README "Fidelity to FP32 vs k"), as edgeq sweep grids; replaces tools/measure_k.py.
#
#   tools/reproduce_core.sh
#
# Per task: svd, magnitude, random × k = 0, 16, 256, 4096 at block 32 and (suffix -per-tensor) per-tensor
# scales, then SST-2 with --exclude-salient-from-scale.  Every cell records top-1 agreement with FP32 (± s.e.),
# mean and max |Δlogit| vs the FP32 PyTorch logits, Σ‖W − Ŵ‖²_F and plan parity (OUT/cells/*.json; Table I in
# OUT/table1.md).  Resumable; run from the repository root.  results/core/k_sweep_*.{json,md} were made by the
# retired tools/measure_k.py: the same figures, except that its agreement was with the PyTorch FP32 argmax and
# the sweep's is with the FP32 ONNX predictions (whether those equal PyTorch's: fp32.json, pytorch_same_predictions).
# Environment: TASKS, THREADS, SHARED.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}
TASKS=${TASKS:-"RTE MRPC SST-2"}
THREADS=${THREADS:-1}
declare -A MODEL=([RTE]=minilm-l6-rte [MRPC]=minilm-l6-mrpc [SST-2]=minilm-l6-sst2)

for task in $TASKS; do
  name=$(echo "$task" | tr 'A-Z' 'a-z' | tr -d '-')
  echo "== $task -> results/core/$name" >&2
  edgeq sweep "$SHARED/models/${MODEL[$task]}" --task "$task" --methods svd,magnitude,random --k 0,16,256,4096 \
    --block-size 32,per-tensor --data-dir "$SHARED/data/glue" --threads "$THREADS" --out "results/core/$name" > /dev/null
done
echo "== SST-2, --exclude-salient-from-scale -> results/core/sst2-exclude" >&2
edgeq sweep "$SHARED/models/minilm-l6-sst2" --task SST-2 --methods svd,magnitude,random --k 0,256,4096 \
  --block-size 32 --exclude-salient-from-scale --data-dir "$SHARED/data/glue" --threads "$THREADS" \
  --out results/core/sst2-exclude > /dev/null
