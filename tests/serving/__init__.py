"""Tests of ``vllm_ptq_ascend/serving/`` (and what it serves end to end)."""
