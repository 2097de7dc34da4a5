"""vLLM plugin entry point (group ``vllm.general_plugins``).

vLLM calls :func:`register` in every process it starts (API server, engine core,
workers), so it must be cheap and idempotent. Heavy imports happen only here,
never at module import time.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register ``ptq_ascend`` with vLLM (once per process) and our schemes with vLLM-Ascend, if present."""
    global _registered
    from vllm_ptq_ascend.integrations.vllm_ascend import register_ascend_schemes

    register_ascend_schemes()  # our linear schemes for labels vLLM-Ascend lacks (no-op without it)
    if _registered:
        return
    from vllm.model_executor.layers.quantization import (
        QUANTIZATION_METHODS,
        register_quantization_config,
    )

    from vllm_ptq_ascend import QUANT_METHOD
    from vllm_ptq_ascend.serving.config import PtqAscendConfig

    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(PtqAscendConfig)
    allow_on_platform(QUANT_METHOD)
    _registered = True


def allow_on_platform(method: str) -> None:
    """Platforms with an allow-list of quantization methods (vLLM-Ascend's NPUPlatform lists only
    ascend, compressed-tensors and fp8 in ``supported_quantization``; ROCm, XPU) refuse any other
    method in ``verify_quantization``: add ours, since our kernels have a backend for each."""
    from vllm.platforms import current_platform

    allowed = getattr(type(current_platform), "supported_quantization", None)
    if allowed and method not in allowed:
        type(current_platform).supported_quantization = [*allowed, method]
