#!/usr/bin/env bash
# W4A16 AWQ (int4 with zero points). SmolLM2's hidden size (576) is not a multiple of 128,
# so the group size is 64; the command refuses a group size that does not divide every layer.
set -euo pipefail
model=$(.venv/bin/python -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir as d; print(d())")
out=.cache/examples/smollm2-w4a16-awq
.venv/bin/vllm-ptq-ascend quantize "$model" --recipe w4a16-awq --group-size 64 --out "$out" --overwrite
exec examples/serve_any_compressed_tensors.sh "$out"
