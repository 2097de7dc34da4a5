#!/usr/bin/env bash
# Issue 17's speed table in one run: every checkpoint format a preset writes, on the embedded
# SmolLM2-135M-Instruct, against bf16 and (where vLLM-CPU has the scheme) stock vLLM on the same checkpoint.
#   bash benchmarks/speed_smollm2.sh [RESULTS_DIR]     (default benchmarks/results/speed_smollm2)
# Speed depends on the format (bits, groups, zero points, transforms), not on how well the rounding was
# tuned, so calibrated presets run on a small set here (16 x 256 tokens, FlatQuant 1 epoch); their accuracy
# is measured by bench_recipes.py and eval at the settings in the README. Checkpoints go to .cache/bench-speed.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s venv
PY=.venv/bin/python
CLI=.venv/bin/vllm-ptq-ascend
OUT=${1:-benchmarks/results/speed_smollm2}
CK=.cache/bench-speed
BASE=$($PY -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir; print(embedded_model_dir())")
SMALL="--calib-samples 16 --calib-seq-len 256"
# name  recipe  extra quantize flags   (group 64: SmolLM2's 576-wide layers take no group of 128)
PRESETS=(
  "w8a8-dynamic|w8a8-dynamic|"
  "w8a8-static|w8a8-smoothquant|--activations static $SMALL"
  "w8a8-flatquant|w8a8-flatquant|--epochs 1 $SMALL"
  "w8a16-channel|w8a16-gptq|--group-size channel $SMALL"
  "w8a16-g64|w8a16-gptq|--group-size 64 $SMALL"
  "w4a16-g64|w4a16-rtn|--group-size 64"
  "w4a16-awq-g64|w4a16-awq|--group-size 64 $SMALL"
  "w4a8-g64|w4a8|--group-size 64 $SMALL"
  "w4a8-channel|w4a8|--group-size channel $SMALL"
  "w4a4-rtn|w4a4-rtn|"
  "w4a4-flatquant|w4a4-flatquant|--epochs 1 $SMALL"
  "w4a4-quip|w4a4-quip|$SMALL"
  "w4a4-mixed|w4a4-mixed|$SMALL"
)
source benchmarks/checkpoints.sh
make_checkpoints
$CLI bench "${MODELS[@]}" --results "$OUT" --no-serve --no-report
# stock vLLM on the same checkpoints, where vLLM-CPU has the scheme (its W4A8 runs torch's reference
# kernel, minutes per call, and it has no W4A4, transforms or CPU W8A16 kernel)
STOCK=()
for m in "${MODELS[@]}"; do
  case "$m" in w8a8-dynamic=*|w8a8-static=*|w4a16-g64=*|w4a16-awq-g64=*) STOCK+=("$m") ;; esac
done
$CLI bench "${STOCK[@]}" --results "$OUT" --stock --no-serve --no-report
$CLI report "$OUT"
