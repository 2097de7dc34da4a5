#!/usr/bin/env bash
# Serve any compressed-tensors W8A8 / W4A16 / W8A16 checkpoint (e.g. from llmcompressor) with our plugin,
# then query it. Usage: examples/serve_any_compressed_tensors.sh CHECKPOINT_DIR
set -euo pipefail
dir=${1:?checkpoint directory}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/vllm serve "$dir" --quantization ptq_ascend --host 127.0.0.1 --port 8011 --max-model-len 1024 &
pid=$!
trap 'kill -INT $pid; wait $pid' EXIT
until curl -sf http://127.0.0.1:8011/health >/dev/null; do sleep 2; done
curl -s http://127.0.0.1:8011/v1/completions -H 'Content-Type: application/json' \
  -d "{\"model\": \"$dir\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8}"
echo
