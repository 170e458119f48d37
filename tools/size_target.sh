#!/usr/bin/env bash
# The size-target commands of issue 26 as they are asked for, each under GNU time (wall, user+sys,
# peak RSS): `cora-onnx quantize --model M --target-ratio R --calib ...` with nothing else but the
# scoring images of the protocol (imagenet-sample/even, crop 0.875) and the output paths.
#     tools/size_target.sh [OUT_DIR] [lite0|resnet18|all] [RATIOS...]
# defaults: a temporary folder (removed afterwards), all, the issue's ratios (Lite0 10 15 20,
# ResNet-18 12 20). Prints each run's report table and its timing lines.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="$(cd "$ROOT/.." && pwd)/shared"
OUT="${1:-}"
WHICH="${2:-all}"
shift $(( $# > 2 ? 2 : $# )) || true
if [ -z "$OUT" ]; then OUT="$(mktemp -d)"; trap 'rm -rf "$OUT"' EXIT; fi
TIME=()
if [ -x /usr/bin/time ]; then TIME=(/usr/bin/time -v); fi
run() {  # model ratio extra-args...
  local model="$1" ratio="$2"; shift 2
  echo "== $model --target-ratio $ratio"
  (cd "$ROOT" && "${TIME[@]}" python -m cora_onnx quantize --model "$model" "$@" --target-ratio "$ratio" \
    --calib "$SHARED/data/imagenette/calib" --val "$SHARED/data/imagenet-sample/even" \
    --class-map "$SHARED/data/imagenet-sample/class_map.json" --crop-ratio 0.875 --latency-runs 0 \
    --out "$OUT/$model-$ratio.onnx" --report "$OUT/$model-$ratio.json" 2>&1) \
    | grep -v '^\[cora-onnx\]' | grep -E -v '^\s+(Average|Major|Minor|Volun|Invol|Swaps|File sys|Socket|Signals|Page size|Exit|Percent|Command)'
}
if [ "$WHICH" = lite0 ] || [ "$WHICH" = all ]; then
  for r in ${@:-10 15 20}; do run efficientnet_lite0 "$r"; done
fi
if [ "$WHICH" = resnet18 ] || [ "$WHICH" = all ]; then
  for r in ${@:-12 20}; do run resnet18 "$r" --weights "$SHARED/models/resnet18-imagenet.pt"; done
fi
