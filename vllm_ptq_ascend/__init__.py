"""vllm-ptq-ascend: post-training quantization of reasoning LLMs, served by vLLM on NPUs, GPUs and CPUs."""

__version__ = "0.1.0"

# The name vLLM knows our quantization method by, and the key that marks a
# compressed-tensors `quantization_config` as written by our recipes.
QUANT_METHOD = "ptq_ascend"
