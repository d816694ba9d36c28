#!/usr/bin/env bash
# GPU benchmarks of gapjax, in one go (under 8 minutes: each item is capped and
# the whole run has a budget, GAPJAX_BENCH_TOTAL_LIMIT_S, default 460 s).
#
#   OUT=/some/dir bash benchmarks/gpu.sh            # on the accelerator machine
#   GAPJAX_BENCH_QUICK=1 OUT=/tmp/b bash benchmarks/gpu.sh   # tiny shapes, any machine
#
# Needs only jax (with CUDA), flax, optax and numpy: nothing here imports gapjax.data,
# gapjax.experiments, TFDS, grain, scikit-learn or matplotlib, and all data is synthetic.
# Writes one JSON per item under $OUT (default ./gpu_bench), a .log next to each, and
# $OUT/summary.json with every target and its distance. Never fails on a time: an item
# that errors or times out is recorded as such and the script goes on.
#
# Items:
#   train_resnet50_bf16  ResNet-50, 224x224, bfloat16, batch 256: images/s (target >= 3000)
#   train_small          cnn (64x64) and ResNet-18 CIFAR stem (32x32), batch 256, bfloat16
#   se_overhead          SE-ResNet-50 / ResNet-50 train step time (target <= 1.05)
#   cam_cost             CAM maps / forward time for ResNet-50 (target <= 0.10)
#   train_vit_b16_bf16   ViT-B/16 (class token), 224x224, bfloat16, batch 256: images/s
#   train_modern_bf16    EfficientNet-B0 and ConvNeXt-T, 224x224, bfloat16, batch 256: images/s
#   pooling              benchmarks/pooling.py: pools against x.sum() and HBM bandwidth
set -uo pipefail

cd "$(dirname "$0")/.."
# benchmarks/pooling.py imports gapjax; make the checkout importable without installing it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-$PWD/gpu_bench}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
QUICK="${GAPJAX_BENCH_QUICK:-0}"
ITEM_LIMIT_S="${GAPJAX_BENCH_ITEM_LIMIT_S:-180}"
# The whole script stays under 8 minutes: an item starts only with >= 45 s left, and is
# cut at the budget's end.
TOTAL_LIMIT_S="${GAPJAX_BENCH_TOTAL_LIMIT_S:-460}"
START=$(date +%s)

# Quick mode: the scripts read GAPJAX_BENCH_QUICK themselves and pick tiny shapes, so no
# sizes are passed; otherwise the GPU sizes below.
if [[ "$QUICK" != "0" ]]; then
  BIG=()
  SMALL=()
  SE=()
  CAM=()
  VIT=()
  MODERN=()
  POOL=(--quick)
else
  BIG=(--batch 256 --repeats 20)
  SMALL=(--batch 256 --repeats 10)
  SE=(--batch 128 --repeats 10)
  CAM=(--batch 64 --repeats 10)
  VIT=(--batch 256 --repeats 10)
  MODERN=(--batch 256 --repeats 10)
  POOL=(--repeats 21)
fi

run_item() {  # name, then the command's arguments
  local name="$1"
  shift
  local began=$(date +%s)
  local left=$(( TOTAL_LIMIT_S - (began - START) ))
  if (( left < 45 )); then
    printf '{"benchmark": "%s", "error": "skipped: the %s s budget of gpu.sh is spent"}\n' \
      "$name" "$TOTAL_LIMIT_S" >"$OUT/$name.json"
    echo "[gpu.sh] $name: skipped (budget spent)" >&2
    return
  fi
  local limit=$(( left < ITEM_LIMIT_S ? left : ITEM_LIMIT_S ))
  timeout "$limit" "$PYTHON" "$@" --out "$OUT/$name.json" >"$OUT/$name.log" 2>&1
  local status=$?
  echo "[gpu.sh] $name: exit $status after $(( $(date +%s) - began )) s" >&2
  if [[ $status -ne 0 && ! -s "$OUT/$name.json" ]]; then
    printf '{"benchmark": "%s", "error": "exit status %s (124 = hit the %s s limit); see %s.log"}\n' \
      "$name" "$status" "$limit" "$name" >"$OUT/$name.json"
  fi
}

"$PYTHON" -c "import jax; print('[gpu.sh] devices:', jax.devices())" >&2

# Most important first: if the budget runs out, the tail items are skipped.
run_item train_resnet50_bf16 benchmarks/train_throughput.py --model resnet50 --dtype bfloat16 "${BIG[@]}"
if [[ -f benchmarks/pooling.py ]]; then
  run_item pooling benchmarks/pooling.py "${POOL[@]}"
else
  echo '{"benchmark": "pooling", "error": "benchmarks/pooling.py not found"}' >"$OUT/pooling.json"
fi
run_item se_overhead benchmarks/se_overhead.py --dtype bfloat16 "${SE[@]}"
run_item cam_cost benchmarks/cam_cost.py --model resnet50 "${CAM[@]}"
run_item train_vit_b16_bf16 benchmarks/train_throughput.py --model vit_b16 --dtype bfloat16 "${VIT[@]}"
run_item train_modern_bf16 benchmarks/train_throughput.py --model efficientnet_b0 --model convnext_tiny --dtype bfloat16 "${MODERN[@]}"
run_item train_small benchmarks/train_throughput.py --model cnn --model resnet18 --dtype bfloat16 "${SMALL[@]}"

"$PYTHON" -c "
import sys
sys.path.insert(0, 'benchmarks')
from common import summarize_run
summarize_run(sys.argv[1], float(sys.argv[2]))
" "$OUT" "$(( $(date +%s) - START ))"
