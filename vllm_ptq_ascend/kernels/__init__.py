"""Kernel selection: an ordered candidate list per platform and kernel family, asked per layer.

As vLLM's ``model_executor/kernels/linear/`` (``_POSSIBLE_KERNELS``, ``choose_mp_linear_kernel``):
:func:`choose_kernel` asks each candidate of the platform, best first, whether it
``can_implement`` the layer's :class:`KernelConfig`, builds the first that can for that layer, and
raises with every candidate's reason when none can. Where vLLM has a kernel for a layer, the
candidate is vLLM's own selection (``VllmInt8Kernel``, ``VllmMixedPrecisionKernel``: cutlass,
Machete, Marlin, ... on CUDA, ROCm and XPU); our kernels cover the NPU, online transforms, W4A4,
W8A16 on CPU and the platforms' gaps, and the portable torch kernels end every list.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

from vllm_ptq_ascend.kernels.base import (
    Int8Kernel,
    Int8LinearSpec,
    IntDynamicKernel,
    IntDynamicSpec,
    KernelConfig,
    LayerShape,
    LinearKernel,
    OnlineKronecker,
    W4A8Spec,
    WeightOnlySpec,
)

__all__ = [
    "Int8Kernel",
    "Int8LinearSpec",
    "IntDynamicKernel",
    "IntDynamicSpec",
    "KernelConfig",
    "LayerShape",
    "LinearKernel",
    "OnlineKronecker",
    "W4A8Spec",
    "WeightOnlySpec",
    "choose_kernel",
    "current_platform_name",
    "platform_kernels",
]
logger = logging.getLogger(__name__)

#: "cpu", "npu", "cuda", "rocm", "xpu" or "torch" (the portable kernels alone) instead of vLLM's platform
BACKEND_ENV = "VLLM_PTQ_ASCEND_KERNELS"


@dataclass(frozen=True)
class Platform:
    """One platform's candidates, best first, per kernel family (spec type)."""

    name: str
    kernels: dict[type, tuple[type[LinearKernel], ...]]
    #: checks every layer must pass before any candidate is asked (the NPU's chip and dtype)
    require: Callable[[KernelConfig], None] | None = None
    #: log a warning when a layer falls back to a portable kernel (the NPU's kernels are the point)
    warn_on_fallback: bool = False


def current_platform_name() -> str:
    """$VLLM_PTQ_ASCEND_KERNELS, else vLLM's current platform's device type."""
    name = os.environ.get(BACKEND_ENV)
    if name:
        return name
    from vllm.platforms import current_platform

    return current_platform.device_type


@lru_cache(maxsize=None)
def platform_kernels(name: str) -> Platform:
    """The candidate lists of platform ``name`` (a platform without its own lists gets the portable ones)."""
    from vllm_ptq_ascend.kernels import composed
    from vllm_ptq_ascend.kernels import torch_generic as portable

    torch_lists = {
        Int8LinearSpec: (portable.TorchInt8Kernel,),
        W4A8Spec: (composed.PerChannelW4A8AsInt8Kernel, portable.TorchW4A8Kernel),
        IntDynamicSpec: (composed.Int8ActivationsAsInt8Kernel, portable.TorchIntDynamicKernel),
        WeightOnlySpec: (composed.ActOrderKernel, portable.TorchWeightOnlyKernel),
    }
    if name == "cpu":
        from vllm_ptq_ascend.cpu_features import request_amx_tiles
        from vllm_ptq_ascend.kernels import cpu, cpu_dequant

        # vLLM-CPU's own AMX attention needs the permission too, and our kernels may not be what asks
        request_amx_tiles()

        return Platform(
            name,
            {
                Int8LinearSpec: (cpu.CpuAmxInt8Kernel, cpu.CpuOneDnnInt8Kernel, portable.TorchInt8Kernel),
                W4A8Spec: (
                    composed.PerChannelW4A8AsInt8Kernel,
                    cpu.CpuW4A8OnInt8GridKernel,
                    portable.TorchW4A8Kernel,
                ),
                IntDynamicSpec: torch_lists[IntDynamicSpec],
                WeightOnlySpec: (
                    composed.ActOrderKernel,
                    cpu.CpuInt4GemvKernel,
                    cpu_dequant.CpuWna16PrefillKernel,
                    cpu.CpuWna16Kernel,
                    cpu_dequant.CpuInt8WeightKernel,
                    cpu.CpuDequantizedKernel,
                    portable.TorchWeightOnlyKernel,  # where the one above is disabled
                ),
            },
        )
    if name == "npu":  # vLLM-Ascend's NPUPlatform.device_type
        from vllm_ptq_ascend.kernels import npu

        return Platform(
            name,
            {
                Int8LinearSpec: (npu.NpuInt8Kernel,),
                W4A8Spec: (
                    composed.PerChannelW4A8AsInt8Kernel,
                    npu.NpuW4A8AntiquantKernel,
                    portable.TorchW4A8Kernel,
                ),
                IntDynamicSpec: (
                    npu.NpuKroneckerKernel,
                    npu.NpuDynamicInt4Kernel,
                    composed.Int8ActivationsAsInt8Kernel,
                    portable.TorchIntDynamicKernel,
                ),
                WeightOnlySpec: (
                    composed.ActOrderKernel,
                    npu.NpuWeightOnlyKernel,
                    portable.TorchWeightOnlyKernel,
                ),
            },
            require=npu.require_npu,
            warn_on_fallback=True,
        )
    if name in ("cuda", "rocm", "xpu"):  # vLLM's own kernels, chosen by vLLM for its platform
        from vllm_ptq_ascend.kernels import triton_quant, vllm_linear

        return Platform(
            name,
            {
                Int8LinearSpec: (vllm_linear.VllmInt8Kernel, portable.TorchInt8Kernel),
                W4A8Spec: (
                    composed.PerChannelW4A8AsInt8Kernel,
                    composed.W4A8AsWeightOnlyKernel,
                    portable.TorchW4A8Kernel,
                ),
                IntDynamicSpec: (
                    composed.Int8ActivationsAsInt8Kernel,
                    triton_quant.TritonIntDynamicKernel,
                    portable.TorchIntDynamicKernel,
                ),
                WeightOnlySpec: (
                    composed.ActOrderKernel,
                    vllm_linear.VllmMixedPrecisionKernel,
                    portable.TorchWeightOnlyKernel,
                ),
            },
        )
    if name != "torch":
        logger.warning(
            "vllm-ptq-ascend has no kernels for platform %r yet; using the portable torch kernels "
            "(exact, but weight-only layers are dequantized at load and nothing is fused)",
            name,
        )
    return Platform(name, torch_lists)


def candidates(config: KernelConfig) -> tuple[type[LinearKernel], ...]:
    family = type(config.spec)
    lists = platform_kernels(config.platform or current_platform_name()).kernels
    if family not in lists:
        raise TypeError(f"no kernel family for {family.__name__}")
    return lists[family]


def disabled_kernels() -> list[str]:
    """Kernel class names in vLLM's own ``VLLM_DISABLED_KERNELS`` (ours and vLLM's alike); none
    where vLLM is not installed (the portable kernels on a bare torch machine, as in benchmarks)."""
    try:
        import vllm.envs as envs
    except ImportError:
        return []

    return envs.VLLM_DISABLED_KERNELS


def first_candidate(
    config: KernelConfig, exclude: tuple[type, ...] = ()
) -> tuple[type[LinearKernel] | None, list[str]]:
    """The first candidate that can implement ``config`` (or None), and the reasons of those before it."""
    reasons = []
    disabled = disabled_kernels()
    for cls in candidates(config):
        if cls in exclude:
            continue
        if cls.__name__ in disabled:
            reasons.append(f"{cls.__name__}: disabled by VLLM_DISABLED_KERNELS")
            continue
        ok, why = cls.can_implement(config)
        if ok:
            return cls, reasons
        reasons.append(f"{cls.__name__}: {why}")
    return None, reasons


def choose_kernel(config: KernelConfig, platform: str | None = None) -> LinearKernel:
    """The kernel object for one layer: the first candidate of ``platform`` (else the config's, else
    the current one) that can implement it."""
    name = platform or config.platform or current_platform_name()
    config = replace(config, platform=name)
    plat = platform_kernels(name)
    if plat.require is not None:
        plat.require(config)
    cls, reasons = first_candidate(config)
    if cls is None:
        raise ValueError(
            f"layer '{config.layer_name}': no {name} kernel can serve {config.spec} on "
            f"{config.in_features} -> {config.out_features} features in {config.params_dtype}: "
            + "; ".join(reasons)
        )
    kernel = cls(config)
    if reasons and plat.warn_on_fallback and cls.fallback(config):
        logger.warning("layer '%s': %s; using %s", config.layer_name, "; ".join(reasons), cls.__name__)
    else:
        logger.debug("layer '%s': %s (passed over: %s)", config.layer_name, cls.__name__, reasons)
    return kernel
