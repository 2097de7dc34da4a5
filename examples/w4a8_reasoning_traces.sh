#!/usr/bin/env bash
# W4A8 (int4 weights, int8 per-token activations) calibrated on the model's own answers:
# vLLM generates them for the shipped GSM8K and HumanEval questions first (cached in
# .cache/calibration). On a model with chain-of-thought modes, mix them, e.g.
#   --calib-modes slow_think:0.5,no_think:0.5     (Qwen3, openPangu-Embedded; see recipes/cot_modes.yaml)
set -euo pipefail
model=${1:-$(.venv/bin/python -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir as d; print(d())")}
out=.cache/examples/$(basename "$model")-w4a8-traces
.venv/bin/vllm-ptq-ascend quantize "$model" --recipe w4a8 --group-size 64 --calib traces \
  --calib-samples 32 --calib-max-new-tokens 256 --out "$out" --overwrite
cat "$out/README.md"
exec examples/serve_any_compressed_tensors.sh "$out"
