"""What the CPU can do: the machine line of results files, and the AMX permission vLLM-CPU needs."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch

from vllm_ptq_ascend.cpu_features import cpu_flags, cpu_model, kernel_isa
from vllm_ptq_ascend.eval.results import machine_description


def test_kernel_isa_lists_the_deciding_flags_in_a_fixed_order():
    epyc_avx2 = {"fpu", "sse2", "avx2", "fma"}
    xeon_amx = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
    assert kernel_isa(epyc_avx2) == "avx2"
    assert kernel_isa(xeon_amx) == "amx_int8 amx_bf16 avx512_bf16 avx512_vnni avx512f avx2"
    assert kernel_isa(set()).startswith("none of amx_int8")


def test_machine_description_names_this_cpu_and_its_flags():
    line = machine_description()
    assert line.startswith(cpu_model() + " (" + kernel_isa(cpu_flags()) + "), ")


AMX_PERMISSION_PROBE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)

def granted():  # arch_prctl(ARCH_GET_XCOMP_PERM): bit 18 is XFEATURE_XTILEDATA, AMX's tile data
    mask = ctypes.c_ulong(0)
    assert libc.syscall(158, 0x1022, ctypes.byref(mask)) == 0, ctypes.get_errno()
    return bool(mask.value >> 18 & 1)

from vllm.platforms import current_platform
current_platform.import_kernels()
before = granted()
from vllm_ptq_ascend import kernels
kernels.platform_kernels("cpu")
print(before, granted())
"""


@pytest.mark.skipif(
    platform.machine() != "x86_64" or not torch.cpu._is_amx_tile_supported(), reason="needs AMX tiles"
)
def test_setting_up_the_cpu_kernels_asks_for_the_amx_tile_state():
    """vLLM-CPU's AMX attention dies of SIGILL unless something in the process asked for the tile state;
    on a per-channel W8A16 engine nothing did (tests/serving/test_compiled_engine.py on an AMX host)."""
    run = subprocess.run(
        [sys.executable, "-c", AMX_PERMISSION_PROBE], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-2:] == ["False", "True"]
