#!/usr/bin/env bash
# EfficientNet-Lite0 at 10x with product quantization (docs/results/pq.md, row s) as one cora-onnx
# command: calibrate on ../shared imagenette/calib, score on imagenet-sample/even; prints the
# command's report, then the wall time and peak RSS (GNU time, when installed).
#     tools/lite0_pq10x.sh [OUT_DIR]        (default: a temporary folder, removed afterwards)
set -euo pipefail
SHARED="$(cd "$(dirname "$0")/../.." && pwd)/shared"
OUT="${1:-}"
if [ -z "$OUT" ]; then OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT; fi
TIME=()
if [ -x /usr/bin/time ]; then TIME=(/usr/bin/time -v); fi
"${TIME[@]}" cora-onnx quantize --model efficientnet_lite0 --method pq \
  --calib "$SHARED/data/imagenette/calib" --val "$SHARED/data/imagenet-sample/even" \
  --class-map "$SHARED/data/imagenet-sample/class_map.json" --crop-ratio 0.875 --calib-size 1600 \
  --stats-patches 128 --finetune-steps 0 --weight-target-layers _fc \
  --uniform-rounding gptq --uniform-clip input --uniform-act-order \
  --uniform-layers '_blocks.[0-5].*,_blocks.[45]._expand_conv:4,_blocks.[45]._project_conv:4,_blocks.[6-9]._expand_conv:3,_blocks.[6-9]._project_conv:3,_blocks.1[0-5]._expand_conv:3,_blocks.1[0-5]._project_conv:3,_blocks.[6-9]._depthwise_conv:4,_blocks.1[0-5]._depthwise_conv:4,_blocks.[67]._project_conv:4,_blocks.10._project_conv:4,_blocks.[78]._expand_conv:4' \
  --latency-runs 0 --threads 2 --out "$OUT/lite0-pq10x.onnx" --report "$OUT/lite0-pq10x.json" 2>&1 \
  | grep -v '^\[cora-onnx\] _' | grep -E -v 'batches \(|^\s+(Average|Major|Minor|Volun|Invol|Swaps|File sys|Socket|Signals|Page size|Exit)'
