"""Put the pure-torch emulation of torch_npu (tests/npu_emulation) in place of torch_npu, for tests only."""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path

EMULATION_DIR = Path(__file__).parent / "npu_emulation" / "torch_npu"


@lru_cache(maxsize=None)
def emulation_module():
    """The emulated torch_npu module (loaded once, without touching sys.path)."""
    spec = importlib.util.spec_from_file_location(
        "torch_npu", EMULATION_DIR / "__init__.py", submodule_search_locations=[str(EMULATION_DIR)]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.EMULATED
    return module


def use_npu_emulation(monkeypatch):
    """``import torch_npu`` yields the emulation (an Atlas A2, ``SOC_NAME``'s default) until the test ends."""
    module = emulation_module()
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setitem(sys.modules, "torch_npu.npu", module.npu)
    return module


def use_chip(monkeypatch, soc_name: str):
    """The emulated torch_npu is the chip ``soc_name`` ("Ascend910_9391", "Ascend310P3") for the test."""
    module = use_npu_emulation(monkeypatch)
    assert soc_name in module.SOC_VERSIONS, soc_name
    monkeypatch.setattr(module, "SOC_NAME", soc_name)
    return module


# the emulated ops that a traced graph must hold as operators (real torch_npu registers every op in the
# ``npu`` namespace; ``torch_npu.npu_dynamic_quant`` is ``torch.ops.npu.npu_dynamic_quant``)
TORCH_OPS = {
    "npu_dynamic_quant": "(Tensor x, *, Tensor? smooth_scales=None, Tensor? group_index=None, "
    "ScalarType? dst_type=None) -> (Tensor, Tensor)",
    "npu_add_rms_norm": "(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) "
    "-> (Tensor, Tensor, Tensor)",
    "npu_add_rms_norm_dynamic_quant": "(Tensor x1, Tensor x2, Tensor gamma, *, Tensor? smooth_scale1=None, "
    "Tensor? smooth_scale2=None, Tensor? beta=None, float epsilon=1e-06, bool[]? output_mask=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


@lru_cache(maxsize=None)
def _npu_library():
    """``torch.ops.npu.<op>`` for TORCH_OPS: the emulation's functions on CPU, shapes only on fake tensors."""
    import torch

    emu = emulation_module()
    lib = torch.library.Library("npu", "DEF")
    for name, schema in TORCH_OPS.items():
        lib.define(name + schema)
        lib.impl(name, getattr(emu, name), "CPU")

    def quant_fake(x, *, smooth_scales=None, group_index=None, dst_type=None):
        return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)

    def norm_fake(x1, x2, gamma, epsilon=1e-6):
        return (
            torch.empty_like(x1),
            x1.new_empty((*x1.shape[:-1], 1), dtype=torch.float32),
            torch.empty_like(x1),
        )

    def fused_fake(x1, x2, gamma, **kwargs):
        y1 = torch.empty_like(x1, dtype=torch.int8)
        scale = x1.new_empty(x1.shape[:-1], dtype=torch.float32)
        return y1, y1.new_empty(0), torch.empty_like(x1), scale, scale.new_empty(0)

    for name, fake in zip(TORCH_OPS, (quant_fake, norm_fake, fused_fake)):
        torch.library.register_fake(f"npu::{name}", fake, lib=lib)
    return lib


def use_npu_torch_ops(monkeypatch):
    """The emulation (as use_npu_emulation) with TORCH_OPS called as torch operators, as real torch_npu's
    are, so that they appear as nodes in a traced graph."""
    import torch

    module = use_npu_emulation(monkeypatch)
    _npu_library()
    for name in TORCH_OPS:
        monkeypatch.setattr(module, name, getattr(torch.ops.npu, name))
    return module
