"""Tests of the embedded model and the tiny models (``vllm_ptq_ascend/assets/``)."""
