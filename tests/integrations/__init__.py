"""Tests of ``vllm_ptq_ascend/integrations/`` (and what it serves end to end)."""
