"""Tests of ``vllm_ptq_ascend/schemes/`` (and what it serves end to end)."""
