"""vLLM's own Triton linear kernels, loaded from vLLM's source files on a machine without vLLM.

vLLM's CUDA candidate lists end in Triton kernels (``TritonInt8ScaledMMLinearKernel`` for W8A8,
``TritonW4A16LinearKernel`` for W4A16); the kernels before them (cutlass, Machete, Marlin) live in
vLLM's compiled ``_C`` library. A GPU machine that has torch and Triton but no vLLM build, and no
package index to fetch one from, can still run the Triton ones: this module reads the named
functions out of vLLM's source files, verbatim, and runs them with ``triton``, ``tl`` and the
few vLLM helpers they call supplied here (each as vLLM evaluates it on CUDA). Import statements
are dropped, nothing else is changed. ``collect`` copies the files out of an installed vLLM.
"""

from __future__ import annotations

import ast
import shutil
import types
from pathlib import Path

import torch

#: file (relative to the vllm package) -> the top-level names taken from it
SOURCES = {
    "model_executor/layers/quantization/compressed_tensors/triton_scaled_mm.py": (
        "is_weak_contiguous",
        "scaled_mm_kernel",
        "_TD_ALLOCATOR_DEVICES",
        "triton_scaled_mm",
    ),
    "model_executor/layers/quantization/utils/int8_utils.py": (
        "round_int8",
        "_per_token_quant_int8",
        "per_token_quant_int8",
    ),
    "model_executor/kernels/linear/mixed_precision/triton_w4a16.py": (
        "triton_w4a16_gemm_kernel",
        "_triton_w4a16_gemm_impl",
    ),
}


class _CudaPlatform:
    """vLLM's ``current_platform`` as these functions query it on CUDA."""

    @staticmethod
    def is_rocm() -> bool:
        return False

    @staticmethod
    def is_xpu() -> bool:
        return False

    @staticmethod
    def is_cuda() -> bool:
        return True


def _use_tensor_descriptor(override: bool | None = None) -> bool:
    # vllm.triton_utils.tensor_descriptor: VLLM_TRITON_USE_TD unset -> current_platform.is_xpu()
    return bool(override) if override is not None else False


def _set_triton_allocator(device: torch.device) -> None:
    # vllm.triton_utils.allocation.set_triton_allocator
    import triton

    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, device=device, dtype=torch.int8))


def _defines(node: ast.stmt, names: set[str]) -> bool:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return node.name in names
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Name) and t.id in names for t in targets)
    if isinstance(node, ast.If):  # a platform if-chain defining one of the names
        return any(_defines(n, names) for n in node.body + node.orelse)
    return False


def load(src_dir: str | Path) -> types.SimpleNamespace:
    """The named functions of :data:`SOURCES`, executed from the files under ``src_dir`` (a vllm
    package directory, or a folder :func:`collect` filled)."""
    import triton
    import triton.language as tl

    src_dir = Path(src_dir)
    namespace = {
        "torch": torch,
        "triton": triton,
        "tl": tl,
        "current_platform": _CudaPlatform(),
        "use_tensor_descriptor": _use_tensor_descriptor,
        "set_triton_allocator": _set_triton_allocator,
        "logger": __import__("logging").getLogger("vllm_triton_source"),
    }
    for rel, names in SOURCES.items():
        path = src_dir / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such vLLM source file (`collect` copies them where vLLM is)")
        tree = ast.parse(path.read_text(), filename=str(path))
        body = [n for n in tree.body if _defines(n, set(names))]
        found = {n for n in names if any(_defines(b, {n}) for b in body)}
        if found != set(names):
            raise ValueError(f"{path}: no top-level {sorted(set(names) - found)} (another vLLM version?)")
        # Triton names a kernel's callees by their module: vLLM's own module name
        namespace["__name__"] = "vllm." + rel[: -len(".py")].replace("/", ".")
        exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return types.SimpleNamespace(**{n: namespace[n] for names in SOURCES.values() for n in names})


def collect(out_dir: str | Path) -> Path:
    """Copy :data:`SOURCES` out of the installed vLLM into ``out_dir`` (with its version)."""
    import importlib.metadata
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("vLLM is not installed here")
    root, out_dir = Path(spec.submodule_search_locations[0]), Path(out_dir)
    for rel in SOURCES:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, out_dir / rel)
    (out_dir / "VERSION").write_text(importlib.metadata.version("vllm") + "\n")
    return out_dir


if __name__ == "__main__":
    import sys

    print(collect(sys.argv[1]))
