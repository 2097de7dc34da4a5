"""Fixtures for the tests that run vLLM-Ascend's own code (tests/vllm_ascend_real.py)."""

from __future__ import annotations

import pytest

from tests import vllm_ascend_real
from tests.integrations import ascend_env
from tests.npu_helpers import use_npu_emulation
from vllm_ptq_ascend import plugin


@pytest.fixture(params=vllm_ascend_real.VERSIONS)
def va(request, monkeypatch, vllm_dist):
    """vLLM-Ascend's real quantization modules, with our schemes registered into its registry."""
    from vllm_ptq_ascend.kernels import BACKEND_ENV

    monkeypatch.setenv(BACKEND_ENV, "npu")
    use_npu_emulation(monkeypatch)
    with vllm_ascend_real.imported(request.param) as mods:
        mods.added = plugin.register() or _added(mods)
        yield mods


def _added(mods):
    return {
        k for k, c in mods.methods.registry._SCHEME_REGISTRY.items() if getattr(c, "_ptq_ascend_adapter", 0)
    }


@pytest.fixture(scope="session")
def model_config(tiny_model):
    from vllm.config import ModelConfig

    # eager: AscendConfig reads pass_config.enable_sp otherwise, a field vLLM 0.32 no longer has
    return ModelConfig(model=str(tiny_model), dtype="bfloat16", enforce_eager=True)


@pytest.fixture(autouse=True)
def _model_config(model_config, monkeypatch):
    monkeypatch.setattr(ascend_env, "MODEL_CONFIG", model_config)
