"""The current vLLM config as vLLM-Ascend's code reads it, for tests that run that code."""

from __future__ import annotations

import sys
from contextlib import contextmanager

# the tiny Llama's vLLM ModelConfig, set for each test by conftest.py (its get_quant_method reads
# hf_config.model_type)
MODEL_CONFIG = None


@contextmanager
def ascend_config(quant_config):
    """A VllmConfig with the tiny Llama's model config and ``quant_config``, current for the block."""
    from vllm.config import VllmConfig, set_current_vllm_config

    vc = VllmConfig()
    object.__setattr__(vc, "model_config", MODEL_CONFIG)
    object.__setattr__(vc, "quant_config", quant_config)
    with set_current_vllm_config(vc):
        # its own settings object (fine-grained TP groups for o_proj / down_proj: off by default)
        sys.modules["vllm_ascend.ascend_config"].init_ascend_config(vc)
        yield vc
