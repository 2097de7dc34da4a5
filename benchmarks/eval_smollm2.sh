#!/usr/bin/env bash
# The report in the README: every preset on the embedded SmolLM2-135M-Instruct, evaluated and
# benchmarked against bf16 on this machine, then `vllm-ptq-ascend report`.
#   bash benchmarks/eval_smollm2.sh [RESULTS_DIR]     (default benchmarks/results/eval_smollm2)
# Resumable: rerun after an interruption and finished items, models and measurements are kept.
# Checkpoints are made once into .cache/bench-recipes (the same ones bench_recipes.py measures).
set -euo pipefail
cd "$(dirname "$0")/.."
make -s venv
PY=.venv/bin/python
CLI=.venv/bin/vllm-ptq-ascend
OUT=${1:-benchmarks/results/eval_smollm2}
CK=.cache/bench-recipes
BASE=$($PY -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir; print(embedded_model_dir())")
# name  recipe  extra quantize flags   (group 64: SmolLM2's 576-wide layers take no group of 128)
PRESETS=(
  "w8a16-gptq-g64|w8a16-gptq|--group-size 64"
  "w8a8-smoothquant-dynamic|w8a8-smoothquant|--activations dynamic"
  "w8a8-smoothquant-static|w8a8-smoothquant|--activations static"
  "w8a8-dynamic|w8a8-dynamic|"
  "w4a16-awq-g64|w4a16-awq|--group-size 64"
  "w4a16-gptq-g64|w4a16-gptq|--group-size 64"
  "w4a8-g64|w4a8|--group-size 64"
  "w4a16-rtn-g64|w4a16-rtn|--group-size 64"
)
source benchmarks/checkpoints.sh
make_checkpoints
$CLI eval "${MODELS[@]}" --results "$OUT" --limit gsm8k=50,humaneval=50 --chunk 50 --no-report
$CLI bench "${MODELS[@]}" --results "$OUT" --no-report
# stock vLLM on the same checkpoint: one W8A8 and one W4A16 preset (it has CPU kernels for both)
STOCK=()
for m in "${MODELS[@]}"; do
  case "$m" in w8a8-dynamic=*|w4a16-awq-g64=*) STOCK+=("$m") ;; esac
done
$CLI bench "${STOCK[@]}" --results "$OUT" --stock --no-report
$CLI report "$OUT"
