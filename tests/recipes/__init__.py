"""Tests of ``vllm_ptq_ascend/recipes/`` (and what it serves end to end)."""
