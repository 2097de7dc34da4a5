"""Tests of ``vllm_ptq_ascend/kernels/`` (and what it serves end to end)."""
