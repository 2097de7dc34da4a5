"""Kernel backends, one per platform, chosen from vLLM's current platform."""

from __future__ import annotations

from functools import lru_cache

from vllm_ptq_ascend.kernels.base import Int8LinearSpec, KernelBackend, WeightOnlySpec

__all__ = ["Int8LinearSpec", "KernelBackend", "WeightOnlySpec", "get_backend"]


@lru_cache(maxsize=None)
def get_backend(platform: str | None = None) -> KernelBackend:
    """The backend for ``platform`` ("cpu", "cuda", "npu"), default: vLLM's current platform."""
    if platform is None:
        from vllm.platforms import current_platform

        platform = current_platform.device_type
    if platform == "cpu":
        from vllm_ptq_ascend.kernels.cpu import CpuBackend

        return CpuBackend()
    raise NotImplementedError(
        f"vllm-ptq-ascend has no kernel backend for platform {platform!r} yet; "
        "available: cpu (the NPU and CUDA backends are tracked in issue 4)."
    )
