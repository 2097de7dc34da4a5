#!/usr/bin/env bash
# KV-cache quantization on the embedded SmolLM2-135M-Instruct (issue 16): W8A8 and W4A8 weights, each with
# the bf16 cache and with `--kv-cache fp8`, through one `eval` (perplexity and KL on held-out text,
# HellaSwag, GSM8K with 2048-token generations for output length and looping) and one `bench` at long
# context (2048-token prompts: KV bytes per token, 4096-token traces that fit, time per output token).
#   bash benchmarks/kv_cache_smollm2.sh [RESULTS_DIR]     (default benchmarks/results/kv_cache_smollm2)
# Resumable, as eval_smollm2.sh; checkpoints are made once into .cache/bench-kv.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s venv
PY=.venv/bin/python
CLI=.venv/bin/vllm-ptq-ascend
OUT=${1:-benchmarks/results/kv_cache_smollm2}
CK=.cache/bench-kv
BASE=$($PY -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir; print(embedded_model_dir())")
# name  recipe  extra quantize flags   (group 64: SmolLM2's 576-wide layers take no group of 128)
PRESETS=(
  "w8a8-dynamic|w8a8-dynamic|"
  "w8a8-dynamic-kv-fp8|w8a8-dynamic|--kv-cache fp8"
  "w4a8-g64|w4a8|--group-size 64"
  "w4a8-g64-kv-fp8|w4a8|--group-size 64 --kv-cache fp8"
)
source benchmarks/checkpoints.sh
make_checkpoints
$CLI eval "${MODELS[@]}" --results "$OUT" --tasks gsm8k,hellaswag --limit gsm8k=20,hellaswag=100 \
  --max-tokens 2048 --chunk 20 --no-report
$CLI bench "${MODELS[@]}" --results "$OUT" --prompt-len 2048 --gen-len 64 --batch 4 --max-model-len 4096 \
  --no-serve --no-report
$CLI report "$OUT"
