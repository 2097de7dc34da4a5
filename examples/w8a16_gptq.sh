#!/usr/bin/env bash
# W8A16 GPTQ, per-channel scales. Stock vLLM-CPU has no W8A16 kernel; ptq_ascend serves it.
set -euo pipefail
model=$(.venv/bin/python -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir as d; print(d())")
out=.cache/examples/smollm2-w8a16-gptq
.venv/bin/vllm-ptq-ascend quantize "$model" --recipe w8a16-gptq --group-size channel --out "$out" --overwrite
exec examples/serve_any_compressed_tensors.sh "$out"
