#!/usr/bin/env bash
# W4A4 with llmcompressor's QuIP rotations + GPTQ: random-Hadamard rotations of every linear's input
# and output, half folded into the weights and half applied online by ptq_ascend when serving.
set -euo pipefail
model=$(.venv/bin/python -c "from vllm_ptq_ascend.assets.embedded import embedded_model_dir as d; print(d())")
out=.cache/examples/smollm2-w4a4-quip
.venv/bin/vllm-ptq-ascend quantize "$model" --recipe w4a4-quip --out "$out" --overwrite
.venv/bin/vllm-ptq-ascend inspect "$out"   # every stored rotation a Hadamard matrix, one per size
exec examples/serve_any_compressed_tensors.sh "$out"
