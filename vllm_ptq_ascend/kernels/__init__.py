"""Kernel backends, one per platform, chosen from vLLM's current platform."""

from __future__ import annotations

import logging
import os
from functools import lru_cache

from vllm_ptq_ascend.kernels.base import (
    Int8LinearSpec,
    IntDynamicSpec,
    KernelBackend,
    OnlineKronecker,
    W4A8Spec,
    WeightOnlySpec,
)

__all__ = [
    "Int8LinearSpec",
    "IntDynamicSpec",
    "KernelBackend",
    "OnlineKronecker",
    "W4A8Spec",
    "WeightOnlySpec",
    "get_backend",
]
logger = logging.getLogger(__name__)


BACKEND_ENV = "VLLM_PTQ_ASCEND_KERNELS"


def get_backend(name: str | None = None) -> KernelBackend:
    """The kernel backend: ``name``, else $VLLM_PTQ_ASCEND_KERNELS, else by vLLM's platform.

    "cpu" uses vLLM-CPU's kernels; "npu" torch_npu's, as vLLM-Ascend calls them; "torch" is the
    portable backend, also used (with a warning) on platforms that have no backend of their own yet.
    """
    name = name or os.environ.get(BACKEND_ENV)
    if name is None:
        from vllm.platforms import current_platform

        name = current_platform.device_type
    return _backend(name)


@lru_cache(maxsize=None)
def _backend(name: str) -> KernelBackend:
    if name == "cpu":
        from vllm_ptq_ascend.kernels.cpu import CpuBackend

        return CpuBackend()
    if name == "npu":  # vLLM-Ascend's NPUPlatform.device_type
        from vllm_ptq_ascend.kernels.npu import NpuBackend

        return NpuBackend()
    from vllm_ptq_ascend.kernels.torch_generic import TorchBackend

    if name != "torch":
        logger.warning(
            "vllm-ptq-ascend has no optimized kernels for platform %r yet; using the portable torch "
            "backend (exact, but weight-only layers are dequantized at load and nothing is fused)",
            name,
        )
    return TorchBackend()
