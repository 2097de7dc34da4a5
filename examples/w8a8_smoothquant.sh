#!/usr/bin/env bash
# W8A8 with SmoothQuant + GPTQ on the embedded SmolLM2-135M, then serve it over HTTP.
# --activations dynamic (per-token scales at run time) is the default; `static` uses one
# calibrated scale per tensor (faster on NPUs, less accurate on small models: see
# benchmarks/results/recipes_smollm2.md). Usage: examples/w8a8_smoothquant.sh [static|dynamic]
set -euo pipefail
model=$(.venv/bin/python -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir as d; print(d())")
out=.cache/examples/smollm2-w8a8-smoothquant
.venv/bin/vllm-ptq-ascend quantize "$model" --recipe w8a8-smoothquant --activations "${1:-dynamic}" \
  --calib-samples 64 --calib-seq-len 512 --out "$out" --overwrite
exec examples/serve_any_compressed_tensors.sh "$out"
