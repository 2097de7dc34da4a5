"""Tests of ``vllm_ptq_ascend/formats/`` (and what it serves end to end)."""
