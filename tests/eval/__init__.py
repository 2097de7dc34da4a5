"""Tests of ``vllm_ptq_ascend/eval/``."""
